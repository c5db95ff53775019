// Package expresstest runs the Express app of internal/expressapp (express 5,
// express-session 1.19.0, connect-redis 9.0.0, node-redis 5) for tests that
// check redisecho's sessions against real express-session ones on a shared
// Redis.
//
// Start finds node and npm (installing Debian's nodejs and npm once when they
// are missing), runs npm ci in internal/expressapp when its node_modules is
// missing or older than package-lock.json, starts node server.js with the
// given environment and waits for it to listen. It never skips: without Node
// the test fails with a hint.
//
// The environment variables server.js reads (see its header) are taken only
// from the env map, never from the test binary's environment; PORT defaults
// to "0" (a free port).
package expresstest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// StartTimeout bounds how long Start waits for the "listening <port>" line.
const StartTimeout = 20 * time.Second

// stopGrace is how long Stop waits after SIGTERM before it kills the app.
const stopGrace = 3 * time.Second

// InstallHint tells how to give the tests the Node.js they need.
const InstallHint = `the express-session compatibility tests need Node.js (18+, 20 tested) and npm, and never skip.
Install them with:   sudo apt-get install -y nodejs npm
then run the tests again (npm ci in internal/expressapp runs by itself).`

// appEnvVars are the variables server.js reads; the test binary's own values
// of them are dropped, so that only Start's env map configures the app.
var appEnvVars = []string{
	"PORT", "REDIS_URL", "REDIS_CLUSTER", "SESSION_SECRET", "SESSION_PREFIX",
	"SESSION_COOKIE", "SESSION_TTL", "COOKIE_MAX_AGE", "COOKIE_SECURE",
	"TRUST_PROXY", "ROLLING", "EXIT_ON_STDIN_CLOSE", "NODE_ENV",
}

// App is a running Express app.
type App struct {
	// URL is the app's base URL, "http://127.0.0.1:<port>", without a
	// trailing slash.
	URL string
	// Port is the TCP port it listens on.
	Port int

	cmd    *exec.Cmd
	stdin  *os.File
	done   chan struct{} // closed when the process has exited
	output *syncBuffer   // its stdout after the listening line, and stderr

	stopOnce sync.Once
}

// Dir returns the directory of the Express app, internal/expressapp, found
// relative to this source file.
func Dir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("expresstest: runtime.Caller failed")
	}
	dir := filepath.Join(filepath.Dir(file), "..", "expressapp")
	if _, err := os.Stat(filepath.Join(dir, "server.js")); err != nil {
		return "", fmt.Errorf("expresstest: the Express app is not where expected: %w", err)
	}
	return filepath.Clean(dir), nil
}

var (
	toolsOnce sync.Once
	nodePath  string
	npmPath   string
	toolsErr  error

	depsOnce sync.Once
	depsErr  error
)

// Start starts the Express app with env (see server.js for the variables)
// and waits until it listens. t.Cleanup stops it; Stop may stop it earlier.
// Any failure is fatal to t.
func Start(t testing.TB, env map[string]string) *App {
	t.Helper()
	dir, err := Dir()
	if err != nil {
		t.Fatalf("%v", err)
	}
	toolsOnce.Do(func() { nodePath, npmPath, toolsErr = findTools() })
	if toolsErr != nil {
		t.Fatalf("expresstest: %v\n\n%s", toolsErr, InstallHint)
	}
	depsOnce.Do(func() { depsErr = ensureDeps(dir, npmPath) })
	if depsErr != nil {
		t.Fatalf("expresstest: installing the Express app's packages in %s: %v", dir, depsErr)
	}

	a := &App{done: make(chan struct{}), output: &syncBuffer{}}
	a.cmd = exec.Command(nodePath, "server.js")
	a.cmd.Dir = dir
	a.cmd.Env = appEnv(env)
	// Own pipes rather than StdoutPipe/StdinPipe: cmd.Wait, which runs
	// concurrently, would close those under the reader.
	stdout, stdoutW, err := os.Pipe()
	if err != nil {
		t.Fatalf("expresstest: %v", err)
	}
	defer stdoutW.Close()
	// server.js (EXIT_ON_STDIN_CLOSE) exits when this pipe closes, which it
	// does when the test binary dies, however it dies.
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatalf("expresstest: %v", err)
	}
	defer stdinR.Close()
	a.stdin = stdinW
	a.cmd.Stdout, a.cmd.Stderr, a.cmd.Stdin = stdoutW, a.output, stdinR
	if err := a.cmd.Start(); err != nil {
		_ = stdout.Close()
		_ = stdinW.Close()
		t.Fatalf("expresstest: starting node server.js: %v", err)
	}
	_ = stdoutW.Close()
	_ = stdinR.Close()
	go func() {
		_ = a.cmd.Wait()
		close(a.done)
	}()
	t.Cleanup(func() {
		a.Stop()
		if t.Failed() {
			t.Logf("expresstest: Express app output:\n%s", a.output.String())
		}
	})

	ports := make(chan int, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		found := false
		for sc.Scan() {
			line := sc.Text()
			if !found {
				if p, ok := strings.CutPrefix(line, "listening "); ok {
					if n, err := strconv.Atoi(strings.TrimSpace(p)); err == nil {
						found = true
						ports <- n
						continue
					}
				}
			}
			a.output.Write([]byte(line + "\n"))
		}
		_, _ = io.Copy(a.output, stdout)
		_ = stdout.Close()
	}()

	timer := time.NewTimer(StartTimeout)
	defer timer.Stop()
	select {
	case a.Port = <-ports:
	case <-a.done:
		t.Fatalf("expresstest: node server.js exited (%v) before listening; output:\n%s", a.cmd.ProcessState, a.output.String())
	case <-timer.C:
		a.Stop()
		t.Fatalf("expresstest: node server.js printed no \"listening <port>\" within %v; output:\n%s", StartTimeout, a.output.String())
	}
	a.URL = "http://127.0.0.1:" + strconv.Itoa(a.Port)
	return a
}

// Stop stops the app: SIGTERM, then a kill after 3 s if it has not exited.
// It waits for the exit and may be called more than once.
func (a *App) Stop() {
	a.stopOnce.Do(func() {
		defer a.stdin.Close()
		p := a.cmd.Process
		select {
		case <-a.done:
			return
		default:
		}
		if err := p.Signal(syscall.SIGTERM); err != nil {
			_ = p.Kill()
		}
		select {
		case <-a.done:
		case <-time.After(stopGrace):
			_ = p.Kill()
			<-a.done
		}
	})
}

// Output returns what the app printed so far (stderr, and stdout after the
// listening line).
func (a *App) Output() string { return a.output.String() }

// Client returns an HTTP client with its own cookie jar, which does not
// follow redirects.
func (a *App) Client() *http.Client {
	jar, _ := cookiejar.New(nil)
	return &http.Client{
		Jar:     jar,
		Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// appEnv is the test binary's environment without the app's variables, plus
// env, plus PORT=0 unless env sets PORT, plus EXIT_ON_STDIN_CLOSE=1.
func appEnv(env map[string]string) []string {
	drop := make(map[string]bool, len(appEnvVars))
	for _, k := range appEnvVars {
		drop[k] = true
	}
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !drop[k] {
			if _, set := env[k]; !set {
				out = append(out, kv)
			}
		}
	}
	if _, ok := env["PORT"]; !ok {
		out = append(out, "PORT=0")
	}
	out = append(out, "EXIT_ON_STDIN_CLOSE=1")
	for k, v := range env {
		if k != "EXIT_ON_STDIN_CLOSE" {
			out = append(out, k+"="+v)
		}
	}
	return out
}

// findTools finds node and npm, installing Debian's nodejs and npm once when
// either is missing.
func findTools() (node, npm string, err error) {
	look := func() (string, string, error) {
		node, err1 := exec.LookPath("node")
		npm, err2 := exec.LookPath("npm")
		return node, npm, errors.Join(err1, err2)
	}
	if node, npm, err = look(); err == nil {
		return node, npm, nil
	}
	apt, aptErr := exec.LookPath("apt-get")
	if aptErr != nil {
		return "", "", fmt.Errorf("node or npm missing (%v) and no apt-get to install them", err)
	}
	var log bytes.Buffer
	install := func() error {
		cmd := exec.Command(apt, "install", "-y", "nodejs", "npm")
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = &log, &log
		return cmd.Run()
	}
	if install() != nil {
		// The package lists may be missing or stale: refresh them once.
		upd := exec.Command(apt, "update")
		upd.Stdout, upd.Stderr = &log, &log
		_ = upd.Run()
		if ierr := install(); ierr != nil {
			return "", "", fmt.Errorf("node or npm missing (%v); apt-get install -y nodejs npm failed: %v\n%s", err, ierr, tail(log.String(), 2000))
		}
	}
	if node, npm, err = look(); err != nil {
		return "", "", fmt.Errorf("node or npm still missing after apt-get install -y nodejs npm: %v", err)
	}
	return node, npm, nil
}

// depsCurrent reports whether dir's node_modules was installed from the
// current package-lock.json: npm writes node_modules/.package-lock.json at
// the end of an install, so it must exist and be no older than the lock.
func depsCurrent(dir string) bool {
	lock, err := os.Stat(filepath.Join(dir, "package-lock.json"))
	if err != nil {
		return false
	}
	hidden, err := os.Stat(filepath.Join(dir, "node_modules", ".package-lock.json"))
	if err != nil {
		return false
	}
	return !hidden.ModTime().Before(lock.ModTime())
}

// ensureDeps runs npm ci in dir unless its node_modules is current, holding
// a lock file so that parallel test binaries do not install at once.
func ensureDeps(dir, npm string) error {
	if depsCurrent(dir) {
		return nil
	}
	unlock, err := lockFile(dir)
	if err != nil {
		return err
	}
	defer unlock()
	if depsCurrent(dir) { // another test binary installed them meanwhile
		return nil
	}
	var log bytes.Buffer
	cmd := exec.Command(npm, "ci", "--no-audit", "--no-fund")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "NODE_ENV=development")
	cmd.Stdout, cmd.Stderr = &log, &log
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("npm ci: %w", err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(5 * time.Minute):
		_ = cmd.Process.Kill()
		<-done
		err = errors.New("timed out after 5 minutes")
	}
	if err != nil {
		return fmt.Errorf("npm ci: %v\n%s", err, tail(log.String(), 4000))
	}
	// npm ci may keep the hidden lockfile's old mtime on a no-op; make sure
	// depsCurrent holds from now on.
	now := time.Now()
	_ = os.Chtimes(filepath.Join(dir, "node_modules", ".package-lock.json"), now, now)
	return nil
}

// lockFile takes an exclusive lock, shared by every process on the machine,
// for installing dir's packages: a file created with O_EXCL in the temporary
// directory. A lock older than lockStale is taken to be left by a dead
// process and removed. It waits at most lockWait.
func lockFile(dir string) (unlock func(), err error) {
	const (
		lockStale = 6 * time.Minute
		lockWait  = 7 * time.Minute
	)
	sum := sha256.Sum256([]byte(dir))
	path := filepath.Join(os.TempDir(), "redisecho-expressapp-"+hex.EncodeToString(sum[:8])+".lock")
	deadline := time.Now().Add(lockWait)
	for {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintf(f, "%d\n", os.Getpid())
			_ = f.Close()
			return func() { _ = os.Remove(path) }, nil
		}
		if !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if fi, serr := os.Stat(path); serr == nil && time.Since(fi.ModTime()) > lockStale {
			_ = os.Remove(path)
			continue
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("lock %s: still held after %v", path, lockWait)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
