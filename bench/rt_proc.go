package main

// The realtime benchmark's processes: the harness re-executes its own
// binary with a subcommand (rt-server, rt-load, rt-publish) for each
// server, the load tool and the publisher, so that none of them shares a
// Go runtime (scheduler, GC, heap) with another. A child speaks a tiny
// line protocol on its standard streams: one JSON request per line on
// stdin, one JSON reply per line on stdout; its logs go to stderr. A child
// exits when its stdin closes, so a harness that dies takes its children
// with it (Pdeathsig as well).

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// subcommands are what main dispatches to before parsing its flags:
// "realtime" (the realtime benchmark) and the processes it starts. Each
// gets the arguments after its name.
var subcommands = map[string]func(args []string) error{
	"realtime":   realtimeMain,
	"rt-server":  serverMain,
	"rt-load":    loadMain,
	"rt-publish": publishMain,
}

// runSubcommand runs the subcommand named by args[0], if it is one, and
// reports whether it was.
func runSubcommand(args []string) bool {
	if len(args) == 0 {
		return false
	}
	f := subcommands[args[0]]
	if f == nil {
		return false
	}
	if err := f(args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "bench %s: %v\n", args[0], err)
		os.Exit(2)
	}
	return true
}

// raiseFileLimit lifts RLIMIT_NOFILE to its hard limit (10,000 idle
// streams need as many sockets on each side).
func raiseFileLimit() error {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return err
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			return err
		}
	}
	return nil
}

// request and reply are the line protocol's messages.
type request struct {
	Op   string          `json:"op"`
	Args json.RawMessage `json:"args,omitempty"`
}

type reply struct {
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
}

// serveRequests is a child's loop: it first writes ready (what the parent
// needs to know, e.g. the listen address) as a reply, then answers each
// request with handle until stdin closes or handle returns errStop.
func serveRequests(ready any, handle func(op string, args json.RawMessage) (any, error)) error {
	out := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(out)
	send := func(v any, err error) error {
		var r reply
		if err != nil {
			r.Error = err.Error()
		} else if v != nil {
			b, merr := json.Marshal(v)
			if merr != nil {
				r.Error = merr.Error()
			} else {
				r.Result = b
			}
		}
		if err := enc.Encode(r); err != nil {
			return err
		}
		return out.Flush()
	}
	if err := send(ready, nil); err != nil {
		return err
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 16<<20)
	for in.Scan() {
		var req request
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			return fmt.Errorf("bad request %q: %w", in.Bytes(), err)
		}
		v, err := handle(req.Op, req.Args)
		stop := errors.Is(err, errStop)
		if stop {
			err = nil
		}
		if err := send(v, err); err != nil {
			return err
		}
		if stop {
			return nil
		}
	}
	return in.Err()
}

// errStop, returned by a handler, answers the request and ends the child.
var errStop = errors.New("stop")

// decodeArgs unmarshals a request's arguments (none is the zero value).
func decodeArgs(raw json.RawMessage, v any) error {
	if len(raw) == 0 {
		return nil
	}
	return json.Unmarshal(raw, v)
}

// child is a running subprocess as the harness sees it.
type child struct {
	name string
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Scanner
	mu   sync.Mutex
	once sync.Once
}

// startChild re-executes this binary as `self sub args...` and decodes its
// ready reply into ready.
func startChild(name, sub string, args []string, ready any) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, append([]string{sub}, args...)...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, in: in, out: bufio.NewScanner(outPipe)}
	c.out.Buffer(make([]byte, 64<<10), 16<<20)
	if err := c.read(ready); err != nil {
		c.Stop()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return c, nil
}

// Pid is the child's process ID.
func (c *child) Pid() int { return c.cmd.Process.Pid }

func (c *child) read(v any) error {
	if !c.out.Scan() {
		if err := c.out.Err(); err != nil {
			return err
		}
		return errors.New("exited")
	}
	var r reply
	if err := json.Unmarshal(c.out.Bytes(), &r); err != nil {
		return fmt.Errorf("bad reply %q: %w", c.out.Bytes(), err)
	}
	if r.Error != "" {
		return errors.New(r.Error)
	}
	if v != nil && len(r.Result) > 0 {
		return json.Unmarshal(r.Result, v)
	}
	return nil
}

// Call sends one request and decodes its reply into result (may be nil).
func (c *child) Call(op string, args, result any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	req := request{Op: op}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return err
		}
		req.Args = b
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := c.in.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("%s %s: %w", c.name, op, err)
	}
	if err := c.read(result); err != nil {
		return fmt.Errorf("%s %s: %w", c.name, op, err)
	}
	return nil
}

// Stop closes the child's stdin (it exits), waits a little, then kills it
// by PID.
func (c *child) Stop() {
	c.once.Do(func() {
		_ = c.in.Close()
		exited := make(chan struct{})
		go func() { _ = c.cmd.Wait(); close(exited) }()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = c.cmd.Process.Kill()
			<-exited
		}
	})
}
