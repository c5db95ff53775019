package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// redisServer is a throwaway redis-server owned by the harness.
type redisServer struct {
	Addr string
	cmd  *exec.Cmd
	done chan struct{}
}

// startRedis starts redis-server on a free loopback port, without
// persistence, and waits until it answers.
func startRedis(ctx context.Context) (*redisServer, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, errors.New("redis-server not found: install it (apt-get install redis-server) or pass -redis host:port")
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no")
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	// Own process group, so a terminal ^C reaches only the harness, which
	// then kills the server by PID; and SIGKILL if the harness dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	s := &redisServer{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(s.done) }()
	logf("started redis-server pid %d on %s", cmd.Process.Pid, s.Addr)

	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := dialRedis(s.Addr)
		if err == nil {
			_, err = c.do("PING")
			c.Close()
			if err == nil {
				return s, nil
			}
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("redis-server exited at start: %v", cmd.ProcessState)
		case <-ctx.Done():
			s.Stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("redis-server on %s did not answer: %w", s.Addr, err)
		}
	}
}

// Stop kills the server by PID and waits for it.
func (s *redisServer) Stop() {
	select {
	case <-s.done:
		return
	default:
	}
	pid := s.cmd.Process.Pid
	_ = s.cmd.Process.Kill()
	select {
	case <-s.done:
		logf("stopped redis-server pid %d", pid)
	case <-time.After(5 * time.Second):
		logf("redis-server pid %d did not exit after SIGKILL", pid)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// redisConn is a bare RESP connection. The harness uses it for INFO so
// that its own traffic is exactly one command per call (a client library
// would add HELLO, CLIENT SETINFO, health checks...).
type redisConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialRedis(addr string) (*redisConn, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	return &redisConn{c: c, r: bufio.NewReader(c)}, nil
}

func (rc *redisConn) Close() error { return rc.c.Close() }

// do sends one command and returns a simple or bulk string reply.
func (rc *redisConn) do(args ...string) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	_ = rc.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(rc.c, b.String()); err != nil {
		return "", err
	}
	line, err := rc.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", errors.New("redis: empty reply")
	}
	switch line[0] {
	case '+':
		return line[1:], nil
	case '-':
		return "", errors.New("redis: " + line[1:])
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return "", fmt.Errorf("redis: unexpected reply %q", line)
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(rc.r, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("redis: unexpected reply %q", line)
}

// totalCalls is the sum of every calls= in INFO commandstats. The INFO
// call itself is not in its own reply but is in the next one.
func (rc *redisConn) totalCalls() (int64, error) {
	info, err := rc.do("INFO", "commandstats")
	if err != nil {
		return 0, err
	}
	var total int64
	for _, line := range strings.Split(info, "\n") {
		if !strings.HasPrefix(line, "cmdstat_") {
			continue
		}
		_, rest, ok := strings.Cut(line, "calls=")
		if !ok {
			return 0, fmt.Errorf("redis: unexpected commandstats line %q", line)
		}
		v, _, _ := strings.Cut(rest, ",")
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("redis: unexpected commandstats line %q", line)
		}
		total += n
	}
	return total, nil
}

// cpuSeconds is used_cpu_user + used_cpu_sys from INFO cpu: the CPU time
// the Redis server has spent.
func (rc *redisConn) cpuSeconds() (float64, error) {
	info, err := rc.do("INFO", "cpu")
	if err != nil {
		return 0, err
	}
	var total float64
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		for _, f := range []string{"used_cpu_user:", "used_cpu_sys:"} {
			if v, ok := strings.CutPrefix(line, f); ok {
				x, err := strconv.ParseFloat(v, 64)
				if err != nil {
					return 0, fmt.Errorf("redis: unexpected cpu line %q", line)
				}
				total += x
			}
		}
	}
	return total, nil
}

// serverVersion returns redis_version from INFO server.
func (rc *redisConn) serverVersion() (string, error) {
	info, err := rc.do("INFO", "server")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
			return v, nil
		}
	}
	return "unknown", nil
}

// useRedis returns the Redis a run measures against: addr when given, else
// a throwaway redis-server that stop ends. kind says which, for the
// report's header.
func useRedis(ctx context.Context, addr string) (_, kind string, stop func(), err error) {
	if addr != "" {
		return addr, "existing, -redis " + addr, func() {}, nil
	}
	srv, err := startRedis(ctx)
	if err != nil {
		return "", "", nil, err
	}
	return srv.Addr, "throwaway redis-server", srv.Stop, nil
}
