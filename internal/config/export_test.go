package config

import (
	"reflect"
	"slices"
	"strings"
)

// ValidateNoFiles is validate without the checks that read files.
func (c *Config) ValidateNoFiles() error { return c.validate(false) }

// DecodeError exposes the go-toml error conversion (the backstop behind the
// schema check) to tests.
func DecodeError(file string, err error) error { return decodeError(file, err) }

// SchemaKeys lists every leaf key of the schema as a dotted path, sorted.
func SchemaKeys() []string {
	var keys []string
	var walk func(prefix string, n *schemaNode)
	walk = func(prefix string, n *schemaNode) {
		if n.kind != kindTable && n.kind != kindTableList {
			keys = append(keys, prefix)
			return
		}
		for name, f := range n.fields {
			walk(strings.TrimPrefix(prefix+"."+name, "."), f)
		}
	}
	walk("", schemaOf(reflect.TypeFor[Config]()))
	slices.Sort(keys)
	return keys
}
