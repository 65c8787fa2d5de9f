package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Client timeouts: reads answer fast; changes may run a long operation on
// the server, which bounds it with DefaultOpTimeout.
const (
	dialTimeout     = 5 * time.Second
	readCallTimeout = time.Minute
	opCallTimeout   = DefaultOpTimeout + time.Minute
	// maxAnswerSize caps an answer (a map of many users is large).
	maxAnswerSize = 256 << 20
)

// Client talks to the admin API over its UNIX socket or over TCP.
type Client struct {
	hc    *http.Client
	base  string // "http://host:port", or "http://usher" on the socket
	token string // sent as a bearer token when not empty
}

// NewClient returns a client for the UNIX socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		d := net.Dialer{Timeout: dialTimeout}
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{hc: &http.Client{Transport: tr}, base: "http://usher"}
}

// NewTCPClient returns a client for the TCP API at baseURL
// ("http://host:port"), sending token as "Authorization: Bearer <token>".
func NewTCPClient(baseURL, token string) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, fmt.Errorf("admin address: %w", err)
	}
	if u.Scheme != "http" || u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("admin address %q: want http://HOST:PORT", baseURL)
	}
	tr := &http.Transport{DialContext: (&net.Dialer{Timeout: dialTimeout}).DialContext, Proxy: nil}
	return &Client{hc: &http.Client{Transport: tr}, base: "http://" + u.Host, token: token}, nil
}

// Error is an answer other than 2xx.
type Error struct {
	Code    int    // HTTP status code
	Status  string // "409 Conflict"
	Message string // the server's "error", if any
}

func (e *Error) Error() string {
	if e.Message != "" {
		return fmt.Sprintf("admin api: %s (%s)", e.Message, e.Status)
	}
	return "admin api: " + e.Status
}

// Do is DoContext with a timeout fitting the method: a minute for GET,
// longer for changes, which may be long operations.
func (c *Client) Do(method, path string, body, out any) error {
	timeout := opCallTimeout
	if method == http.MethodGet || method == http.MethodHead {
		timeout = readCallTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return c.DoContext(ctx, method, path, body, out)
}

// DoContext sends a request with an optional JSON body and decodes the JSON
// answer into out (unless nil). Answers other than 2xx become *Error.
func (c *Client) DoContext(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("admin api: encode request: %w", err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return fmt.Errorf("admin api: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("admin api: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswerSize+1))
	if err != nil {
		return fmt.Errorf("admin api: read answer: %w", err)
	}
	if len(data) > maxAnswerSize {
		return fmt.Errorf("admin api: answer larger than %d bytes", maxAnswerSize)
	}
	if resp.StatusCode/100 != 2 {
		e := &Error{Code: resp.StatusCode, Status: resp.Status}
		var ea ErrorAnswer
		if json.Unmarshal(data, &ea) == nil {
			e.Message = ea.Error
		}
		return e
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("admin api: decode answer: %w", err)
		}
	}
	return nil
}

// IsStatus reports whether err is an API answer with HTTP status code.
func IsStatus(err error, code int) bool {
	e, ok := errors.AsType[*Error](err)
	return ok && e.Code == code
}

// UserPath returns the API path of a user.
func UserPath(user string) string { return "/v1/users/" + url.PathEscape(user) }

// BackendPath returns the API path of a backend.
func BackendPath(addr string) string { return "/v1/backends/" + url.PathEscape(addr) }
