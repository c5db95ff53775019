package redistest

import (
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Server is one redis-server process started by this package, on a loopback
// port of its own. It can be stopped and started again on the same port,
// with the same cluster identity (its nodes.conf stays in its directory).
type Server struct {
	port    int
	cluster bool
	dir     string

	mu  sync.Mutex
	cmd *exec.Cmd
}

// NewServer reserves a free port (and, for a cluster node, its bus port) and
// a temporary directory for a server; Start launches it. cluster makes it a
// Redis Cluster node.
func NewServer(cluster bool) (*Server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "redisecho-test-*")
	if err != nil {
		return nil, err
	}
	return &Server{port: port, cluster: cluster, dir: dir}, nil
}

// Addr is the server's address, "127.0.0.1:<port>".
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Port is the server's TCP port.
func (s *Server) Port() int { return s.port }

var portMu sync.Mutex

// freePort returns a loopback port that is free, and whose cluster bus port
// (port+10000) is free too, so that cluster nodes can use the default bus port
// (which works on every Redis version, unlike cluster-port). Both lie below
// 32768, where Linux's ephemeral ports start, so that a server stopped and
// restarted by a fault test does not find its port taken by some client's
// outgoing connection.
func freePort() (int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	for range 200 {
		n, err := rand.Int(rand.Reader, big.NewInt(12768))
		if err != nil {
			return 0, err
		}
		port := 10000 + int(n.Int64())
		if portFree(port) && portFree(port+10000) {
			return port, nil
		}
	}
	return 0, errors.New("no free loopback port pair found")
}

func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

// ServerBinary returns the redis-server binary to run: $REDISECHO_REDIS_SERVER
// when set, else redis-server from PATH.
func ServerBinary() (string, error) {
	if b := os.Getenv("REDISECHO_REDIS_SERVER"); b != "" {
		return b, nil
	}
	b, err := exec.LookPath("redis-server")
	if err != nil {
		return "", fmt.Errorf("redis-server not found in PATH: %w", err)
	}
	return b, nil
}

// Start launches the process, without persistence, and waits until it
// answers PING. The process dies with the test binary where the platform
// allows it (a parent-death signal on Linux).
func (s *Server) Start() error {
	bin, err := ServerBinary()
	if err != nil {
		return err
	}
	args := []string{
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", s.dir,
		"--logfile", filepath.Join(s.dir, "redis.log"),
	}
	if s.cluster {
		args = append(args,
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "2000",
			// A failed master must not take down the slots of healthy ones:
			// per-node degradation is part of what the suites test.
			"--cluster-require-full-coverage", "no",
		)
	}
	cmd := exec.Command(bin, args...)
	setChildAttrs(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.mu.Lock()
	s.cmd = cmd
	s.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := Do(s.Addr(), 500*time.Millisecond, "PING"); err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("redis-server on port %d exited at start: %s", s.port, s.logTail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return fmt.Errorf("redis-server on port %d did not answer PING: %s", s.port, s.logTail())
		}
	}
}

// Stop kills the process by PID (which also ends a paused one) and waits
// until its port is free again. Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd := s.cmd
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Kill()
	for range 200 {
		if portFree(s.port) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Pause freezes the process (SIGSTOP): its connections stay open and
// commands hang, as with a stalled host. Resume undoes it.
func (s *Server) Pause() error { return s.withProcess(pauseProcess) }

// Resume continues a process frozen by Pause (SIGCONT).
func (s *Server) Resume() error { return s.withProcess(resumeProcess) }

func (s *Server) withProcess(fn func(*os.Process) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return fmt.Errorf("server on port %d is not running", s.port)
	}
	return fn(s.cmd.Process)
}

// remove stops the server and deletes its directory.
func (s *Server) remove() {
	s.Stop()
	_ = os.RemoveAll(s.dir)
}

func (s *Server) logTail() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "redis.log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}
