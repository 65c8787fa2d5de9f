package config

import (
	"encoding"
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// The schema check walks the parsed TOML document against the shape of
// Config before it is decoded. It exists because go-toml alone
//   - matches keys to fields case-insensitively, while TOML keys are
//     case-sensitive (TOML v1.0.0, "Keys"), so "User_Expire" would be
//     accepted and could silently override "user_expire";
//   - reports a non-string value for a Duration (user_expire = 15) without
//     key or line.
//
// It reports unknown keys, keys in the wrong case and values of the wrong TOML
// type, each with file, line and key. The one map-typed table, [tags], takes
// arbitrary keys; the checker also checks its keys (domains) and values
// (tags) with checkTagDomain and checkTagValue, so that those problems get a
// line number too (Validate repeats the checks for a Config built in code). The decoder (with
// DisallowUnknownFields) stays as a backstop and reports syntax errors and
// duplicate keys.

// valueKind is what the schema expects at a key.
type valueKind int

const (
	kindString valueKind = iota
	kindInt
	kindFloat // a TOML float or integer
	kindBool
	kindDuration
	kindStringList
	kindTable
	kindTableList
	kindStringMap // a table with arbitrary keys and string values: [tags]
)

func (k valueKind) String() string {
	switch k {
	case kindString:
		return "a string"
	case kindInt:
		return "an integer"
	case kindFloat:
		return "a number"
	case kindBool:
		return "a boolean"
	case kindDuration:
		return `a duration string like "15m"`
	case kindStringList:
		return "an array of strings"
	case kindTable:
		return "a table"
	case kindTableList:
		return "an array of tables"
	case kindStringMap:
		return "a table of strings"
	}
	return "?"
}

// schemaNode describes one key: its kind and, for tables and arrays of
// tables, the keys inside.
type schemaNode struct {
	kind   valueKind
	fields map[string]*schemaNode // kindTable, kindTableList
}

var textUnmarshalerType = reflect.TypeFor[encoding.TextUnmarshaler]()

// schemaOf derives the schema from a Go type the way go-toml decodes it,
// restricted to the kinds Config uses. It panics on other kinds: that is a
// programming error in types.go, caught by every test.
func schemaOf(t reflect.Type) *schemaNode {
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(textUnmarshalerType) {
		return &schemaNode{kind: kindDuration}
	}
	switch t.Kind() {
	case reflect.String:
		return &schemaNode{kind: kindString}
	case reflect.Int, reflect.Int64:
		return &schemaNode{kind: kindInt}
	case reflect.Float64:
		return &schemaNode{kind: kindFloat}
	case reflect.Bool:
		return &schemaNode{kind: kindBool}
	case reflect.Struct:
		n := &schemaNode{kind: kindTable, fields: map[string]*schemaNode{}}
		for f := range t.Fields() {
			if !f.IsExported() {
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "-" {
				continue
			}
			if name == "" {
				name = f.Name
			}
			n.fields[name] = schemaOf(f.Type)
		}
		return n
	case reflect.Map:
		if t.Key().Kind() == reflect.String && schemaOf(t.Elem()).kind == kindString {
			return &schemaNode{kind: kindStringMap}
		}
	case reflect.Slice:
		switch elem := schemaOf(t.Elem()); elem.kind {
		case kindString:
			return &schemaNode{kind: kindStringList}
		case kindTable:
			return &schemaNode{kind: kindTableList, fields: elem.fields}
		}
	}
	panic(fmt.Sprintf("config: schema: unsupported type %s", t))
}

// maxSchemaProblems caps the problems checkSchema reports; finding the line
// of each costs a scan of the document.
const maxSchemaProblems = 20

// schemaChecker holds the state of one checkSchema run.
type schemaChecker struct {
	file     string
	p        *unstable.Parser
	problems []error
}

// full reports whether the problem cap is reached.
func (c *schemaChecker) full() bool { return len(c.problems) > maxSchemaProblems }

// line returns the line a range of the document starts on.
func (c *schemaChecker) line(r unstable.Range) int { return c.p.Shape(r).Start.Line }

// checkSchema returns the schema problems of a TOML document. It returns nil
// if the document does not parse: the decoder then reports the syntax error.
func checkSchema(data []byte, file string) []error {
	root := schemaOf(reflect.TypeFor[Config]())
	c := &schemaChecker{file: file, p: &unstable.Parser{}}
	c.p.Reset(data)

	table := root // schema of the current [table]; nil if it is unknown
	var tablePath []string
	for !c.full() && c.p.NextExpression() {
		e := c.p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			tablePath, table = c.header(root, e)
		case unstable.KeyValue:
			if table != nil {
				c.keyValue(table, tablePath, e)
			}
		}
	}
	if c.p.Error() != nil {
		return nil
	}
	if c.full() {
		c.problems = append(c.problems[:maxSchemaProblems], &fileError{
			file: c.file, msg: fmt.Sprintf("more than %d problems, stopped checking", maxSchemaProblems),
		})
	}
	return c.problems
}

// problem reports a problem with key, found at the key starting at at.
func (c *schemaChecker) problem(at unstable.Range, key []string, format string, args ...any) {
	if c.full() {
		return
	}
	c.problems = append(c.problems, &fileError{
		file: c.file, line: c.line(at), key: strings.Join(key, "."),
		msg: fmt.Sprintf(format, args...),
	})
}

// unknown reports key (the whole path) as unknown, with a hint when only
// the case of its last part is wrong.
func (c *schemaChecker) unknown(at unstable.Range, key []string, in *schemaNode) {
	if c.full() {
		return
	}
	msg := fmt.Sprintf("unknown key %q", strings.Join(key, "."))
	last := key[len(key)-1]
	for name := range in.fields {
		if strings.EqualFold(name, last) {
			msg += fmt.Sprintf(" (keys are case-sensitive: did you mean %q?)", name)
			break
		}
	}
	c.problems = append(c.problems, &fileError{file: c.file, line: c.line(at), msg: msg})
}

// keyParts returns the parts of a dotted key and the range of its first part.
func (c *schemaChecker) keyParts(e *unstable.Node) ([]string, unstable.Range) {
	var parts []string
	var at unstable.Range
	it := e.Key()
	for it.Next() {
		k := it.Node()
		if parts == nil {
			at = k.Raw
		}
		parts = append(parts, string(k.Data))
	}
	return parts, at
}

// header checks a [table] or [[array.table]] header and returns its path and
// schema, or a nil schema if the header is wrong (its keys are then skipped).
func (c *schemaChecker) header(root *schemaNode, e *unstable.Node) ([]string, *schemaNode) {
	parts, at := c.keyParts(e)
	n := root
	for i, part := range parts {
		next, ok := n.fields[part]
		if !ok {
			c.unknown(at, parts[:i+1], n)
			return nil, nil
		}
		n = next
		last := i == len(parts)-1
		switch {
		case !last && (n.kind == kindTable || n.kind == kindTableList):
			// [a.b] with a an array of tables names a table in its last element.
		case !last && n.kind == kindStringMap:
			// [tags.x]: the entries of a string map are strings, not tables.
			c.problem(at, mapKey(parts[:i+1], parts[i+1]), "want a string, got a table (write [%s] and then %q = \"tag\")",
				strings.Join(parts[:i+1], "."), strings.Join(parts[i+1:], "."))
			return nil, nil
		case last && e.Kind == unstable.Table && (n.kind == kindTable || n.kind == kindStringMap),
			last && e.Kind == unstable.ArrayTable && n.kind == kindTableList:
		case last && e.Kind == unstable.Table && n.kind == kindTableList:
			c.problem(at, parts, "is an array of tables: write [[%s]]", strings.Join(parts, "."))
			return nil, nil
		case last && e.Kind == unstable.ArrayTable && (n.kind == kindTable || n.kind == kindStringMap):
			c.problem(at, parts, "is a single table: write [%s]", strings.Join(parts, "."))
			return nil, nil
		default:
			c.problem(at, parts[:i+1], "want %s, got a table", n.kind)
			return nil, nil
		}
	}
	return parts, n
}

// keyValue checks a key = value line (or an entry of an inline table) found
// in a table whose schema is table and path is path.
func (c *schemaChecker) keyValue(table *schemaNode, path []string, e *unstable.Node) {
	parts, at := c.keyParts(e)
	key := append(append([]string(nil), path...), parts...)
	n := table
	for i, part := range parts {
		if n.kind == kindStringMap {
			// part is an entry of the map, e.g. [tags] "example.org" = "pool".
			c.mapEntry(key[:len(path)+i], parts[i:], at, e.Value())
			return
		}
		next, ok := n.fields[part]
		if !ok {
			c.unknown(at, key[:len(path)+i+1], n)
			return
		}
		n = next
		if i < len(parts)-1 && n.kind != kindTable && n.kind != kindStringMap {
			// A dotted key defines tables along the way (TOML v1.0.0, "Keys").
			c.problem(at, key[:len(path)+i+1], "want %s, got a table", n.kind)
			return
		}
	}
	c.value(n, key, at, e.Value())
}

// mapEntry checks an entry of the [tags] map, which is at path: its key
// parts (more than one when the key was dotted) and its value. Keys are
// domains, values backend tags.
func (c *schemaChecker) mapEntry(path, parts []string, at unstable.Range, v *unstable.Node) {
	key := mapKey(path, parts[0])
	if len(parts) > 1 {
		// A dotted key defines tables along the way (TOML v1.0.0, "Keys"):
		// example.org = "x" is {example = {org = "x"}}.
		c.problem(at, key, "want a string, got a table%s", dottedHint(parts))
		return
	}
	if v.Kind != unstable.String {
		c.problem(at, key, "want a string (a backend tag), got %s", tomlKind(v.Kind))
		return
	}
	if err := checkTagDomain(parts[0]); err != nil {
		c.problem(at, key, "%v", err)
	}
	if err := checkTagValue(string(v.Data)); err != nil {
		c.problem(at, key, "%v", err)
	}
}

// mapKey returns path plus an entry name of a map, quoted when it is not a
// bare TOML key, so "tags.example.org" reads tags."example.org".
func mapKey(path []string, name string) []string {
	return append(append([]string(nil), path...), quoteKey(name))
}

// dottedHint explains an unquoted domain in [tags]: its dots made tables.
func dottedHint(parts []string) string {
	if len(parts) < 2 {
		return ""
	}
	return fmt.Sprintf(" (a domain with dots must be quoted: %q = \"tag\")", strings.Join(parts, "."))
}

// quoteKey writes a key part the way TOML needs it: bare if it only has
// A-Za-z0-9_- (TOML v1.0.0, "Keys"), else as a quoted key.
func quoteKey(k string) string {
	if k == "" {
		return `""`
	}
	for i := 0; i < len(k); i++ {
		b := k[i]
		if !(b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '_' || b == '-') {
			return strconv.Quote(k)
		}
	}
	return k
}

// value checks that v has the kind n wants.
func (c *schemaChecker) value(n *schemaNode, key []string, at unstable.Range, v *unstable.Node) {
	ok := false
	switch n.kind {
	case kindString, kindDuration:
		ok = v.Kind == unstable.String
	case kindInt:
		ok = v.Kind == unstable.Integer
	case kindFloat:
		ok = v.Kind == unstable.Float || v.Kind == unstable.Integer
	case kindBool:
		ok = v.Kind == unstable.Bool
	case kindStringList:
		if ok = v.Kind == unstable.Array; ok {
			for it := v.Children(); it.Next(); {
				if it.Node().Kind != unstable.String {
					c.problem(at, key, "want %s, got an array holding %s", n.kind, tomlKind(it.Node().Kind))
					return
				}
			}
		}
	case kindTable, kindStringMap:
		if ok = v.Kind == unstable.InlineTable; ok {
			c.inlineTable(n, key, v)
		}
	case kindTableList:
		if ok = v.Kind == unstable.Array; ok {
			for it := v.Children(); it.Next(); {
				if it.Node().Kind != unstable.InlineTable {
					c.problem(at, key, "want %s, got an array holding %s", n.kind, tomlKind(it.Node().Kind))
					return
				}
			}
			for it := v.Children(); it.Next(); {
				c.inlineTable(n, key, it.Node())
			}
		}
	}
	if !ok {
		c.problem(at, key, "want %s, got %s", n.kind, tomlKind(v.Kind))
	}
}

func (c *schemaChecker) inlineTable(n *schemaNode, key []string, v *unstable.Node) {
	for it := v.Children(); it.Next(); {
		if kv := it.Node(); kv.Kind == unstable.KeyValue {
			c.keyValue(n, key, kv)
		}
	}
}

// tomlKind names a TOML value kind for messages.
func tomlKind(k unstable.Kind) string {
	switch k {
	case unstable.String:
		return "a string"
	case unstable.Integer:
		return "an integer"
	case unstable.Float:
		return "a float"
	case unstable.Bool:
		return "a boolean"
	case unstable.Array:
		return "an array"
	case unstable.InlineTable:
		return "an inline table"
	case unstable.LocalDate, unstable.LocalTime, unstable.LocalDateTime, unstable.DateTime:
		return "a date/time"
	}
	return "a " + strings.ToLower(k.String())
}
