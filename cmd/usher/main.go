// Command usher is a mail director: it pins every mail user to one backend
// and proxies IMAP and POP3 sessions to it. See internal/cli.
package main

import (
	"os"

	"github.com/usher-mail/usher/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
