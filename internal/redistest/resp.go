package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// Do sends one command over a fresh connection and reads one RESP2 reply:
// a string, an int64, a []any, nil for a null, or an error for a Redis
// error reply. Test harnesses talk to servers this way, not through rueidis,
// so that their admin traffic neither depends on nor disturbs the client
// under test.
func Do(addr string, timeout time.Duration, args ...string) (any, error) {
	c, err := dial(addr, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.send(args...); err != nil {
		return nil, err
	}
	return c.read()
}

// conn is a RESP2 connection for commands sent in a pipeline.
type conn struct {
	net.Conn
	timeout time.Duration
	r       *bufio.Reader
	w       *bufio.Writer
}

// dial connects to addr. Each send, with the reads of its replies, must end
// within timeout.
func dial(addr string, timeout time.Duration) (*conn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	return &conn{Conn: c, timeout: timeout, r: bufio.NewReader(c), w: bufio.NewWriter(c)}, nil
}

// queue writes a command to the buffer; send flushes it.
func (c *conn) queue(args ...string) {
	fmt.Fprintf(c.w, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(c.w, "$%d\r\n%s\r\n", len(a), a)
	}
}

// send writes everything queued and then a command, and gives them and
// the reads of their replies a new deadline.
func (c *conn) send(args ...string) error {
	_ = c.SetDeadline(time.Now().Add(c.timeout))
	c.queue(args...)
	return c.w.Flush()
}

// read reads one reply.
func (c *conn) read() (any, error) { return readRESP(c.r) }

func readRESP(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("empty RESP line")
	}
	switch line[0] {
	case '+':
		return line[1:], nil
	case '-':
		return nil, errors.New(line[1:])
	case ':':
		return strconv.ParseInt(line[1:], 10, 64)
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = readRESP(r); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unexpected RESP line %q", line)
}
