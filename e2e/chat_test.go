package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho/internal/redistest"
)

// installHint says how to get the browser; the test never skips.
const installHint = "install it with `make e2e`, or: apt-get install chromium"

// sessionSecret is the instances' shared session key.
const sessionSecret = "e2e-session-key-of-at-least-thirty-two-bytes"

// wait bounds every wait of the test: generous, for a slow CI machine.
const wait = 30 * time.Second

// TestChatAcrossInstancesAndRestart drives the demo page in headless
// Chromium against two instances of the example on one Redis deployment, a
// standalone server and a 3-master cluster in turn: a message posted to
// instance A appears on the page connected to instance B. Then B stops,
// three messages are posted to A, and B starts again on the same address:
// once its /health answers 200, the page (which reconnects by itself, with
// its last position) shows the three messages exactly once and in order,
// and announces its visitor only once (a resumed connection does not).
// Set E2E_SCREENSHOT to a file name to keep a picture of the page at the
// end.
func TestChatAcrossInstancesAndRestart(t *testing.T) {
	browserPath, err := exec.LookPath("chromium")
	require.NoError(t, err, "the browser test needs Debian's chromium: %s", installHint)
	bin := buildExample(t)
	for _, topology := range []string{"standalone", "cluster"} {
		t.Run(topology, func(t *testing.T) {
			tp, err := redistest.Start(topology)
			require.NoError(t, err, "%s", redistest.InstallHint)
			t.Cleanup(tp.Close)
			chatAcrossInstancesAndRestart(t, browserPath, bin, tp.URL())
		})
	}
}

func chatAcrossInstancesAndRestart(t *testing.T, browserPath, bin, redisURL string) {
	a := startInstance(t, bin, freeAddr(t), redisURL)
	bAddr := freeAddr(t)
	b := startInstance(t, bin, bAddr, redisURL)

	page := newPage(t, browserPath)
	require.NoError(t, chromedp.Do(page,
		chromedp.Navigate(b.base+"/?room=e2e"),
		chromedp.WaitVisible(chromedp.CSS(`#status[data-state="live"]`)),
	))
	post(t, a.base, "e2e", "hello from A")
	waitMessages(t, page, []string{"hello from A"})

	b.stop(t)
	waitStatus(t, page, "reconnecting")
	for _, text := range []string{"one", "two", "three"} {
		post(t, a.base, "e2e", text)
	}
	startInstance(t, bin, bAddr, redisURL) // B again; returns once /health answers 200
	healthy := time.Now()
	waitMessages(t, page, []string{"hello from A", "one", "two", "three"})
	t.Logf("the page caught up %v after B's /health answered 200", time.Since(healthy).Round(time.Millisecond))

	// Nothing more comes before the next live message: no duplicate, and
	// the resumed connection announced nobody.
	post(t, a.base, "e2e", "after the restart")
	waitMessages(t, page, []string{"hello from A", "one", "two", "three", "after the restart"})
	notes, err := chromedp.Run(page, chromedp.Evaluate[[]string](
		`[...document.querySelectorAll('#messages li.info')].map(e => e.textContent)`))
	require.NoError(t, err)
	require.Equal(t, []string{"anonymous joined #e2e"}, notes, "one join, and no reset")

	// The page's own form posts to B, and the stream shows the message.
	require.NoError(t, chromedp.Do(page,
		chromedp.SendKeys(chromedp.CSS(`#post input[name="text"]`), "typed on B"),
		chromedp.Click(chromedp.CSS(`#post button`)),
	))
	waitMessages(t, page, []string{"hello from A", "one", "two", "three", "after the restart", "typed on B"})
	if path := os.Getenv("E2E_SCREENSHOT"); path != "" {
		png, err := chromedp.Run(page, chromedp.FullScreenshot(100))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path, png, 0o644))
	}
}

// freeAddr returns a loopback address with a port that was free, below
// 32768 where Linux's ephemeral ports start, so that no outgoing
// connection takes it while an instance restarts on it.
func freeAddr(t *testing.T) string {
	t.Helper()
	for range 200 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(10000+rand.IntN(22768)))
		if ln, err := net.Listen("tcp", addr); err == nil {
			_ = ln.Close()
			return addr
		}
	}
	t.Fatal("no free loopback port")
	return ""
}

// buildExample builds the example app from ../example.
func buildExample(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "example")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = filepath.Join("..", "example")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "build the example: %s", out)
	return bin
}

// instance is a running example app.
type instance struct {
	base   string
	cmd    *exec.Cmd
	log    *redistest.SyncBuffer
	exited chan struct{} // closed once the process has exited
	err    error         // its exit, once exited is closed
}

// startInstance runs the example at addr on redisURL and returns once its
// /health answers 200 (the full app serves). It is stopped when the test
// ends, unless it was stopped before.
func startInstance(t *testing.T, bin, addr, redisURL string) *instance {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(),
		"ADDR="+addr, "REDIS_URL="+redisURL, "SESSION_SECRET="+sessionSecret, "COOKIE_INSECURE=1")
	in := &instance{base: "http://" + addr, cmd: cmd, log: &redistest.SyncBuffer{}, exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = in.log, in.log
	require.NoError(t, cmd.Start())
	go func() {
		in.err = cmd.Wait()
		close(in.exited)
	}()
	t.Cleanup(func() {
		in.stop(t)
		if t.Failed() {
			t.Logf("log of the instance at %s:\n%s", addr, in.log)
		}
	})
	hc := &http.Client{Timeout: 2 * time.Second}
	for deadline := time.Now().Add(wait); ; time.Sleep(50 * time.Millisecond) {
		select {
		case <-in.exited:
			t.Fatalf("the instance at %s exited: %v\n%s", addr, in.err, in.log)
		default:
		}
		if resp, err := hc.Get(in.base + "/health"); err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return in
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the instance at %s did not answer /health with 200 within %v:\n%s", addr, wait, in.log)
		}
	}
}

// stop ends the instance as a deployment does, with SIGTERM, and requires
// a clean exit.
func (in *instance) stop(t *testing.T) {
	t.Helper()
	select {
	case <-in.exited:
		return // stopped already
	default:
	}
	_ = in.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-in.exited:
		require.NoError(t, in.err, "a graceful shutdown exits 0:\n%s", in.log)
	case <-time.After(wait):
		_ = in.cmd.Process.Kill()
		<-in.exited
		t.Fatalf("the instance at %s did not stop on SIGTERM within %v:\n%s", in.base, wait, in.log)
	}
}

// post posts a chat message to room on the instance at base.
func post(t *testing.T, base, room, text string) {
	t.Helper()
	body, err := json.Marshal(map[string]string{"text": text})
	require.NoError(t, err)
	resp, err := http.Post(base+"/rooms/"+room+"/messages", "application/json", bytes.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "post %q", text)
}

// newPage starts headless Chromium and returns a context for one tab. As
// root, Chromium runs only without its sandbox.
func newPage(t *testing.T, browserPath string) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browserPath),
		chromedp.Flag("disable-dev-shm-usage", true),
	)
	if os.Geteuid() == 0 {
		opts = append(opts, chromedp.NoSandbox)
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancel()
		cancelAlloc()
	})
	// Start the browser now, so that its start-up is not counted in the
	// first wait.
	require.NoError(t, chromedp.Do(ctx), "start %s", browserPath)
	var mu sync.Mutex
	var console []string
	go func() {
		for m, err := range chromedp.Console(ctx) {
			if err != nil {
				return
			}
			mu.Lock()
			console = append(console, m.String())
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		if t.Failed() {
			mu.Lock()
			defer mu.Unlock()
			t.Logf("the page's console:\n%s", strings.Join(console, "\n"))
		}
	})
	return ctx
}

// messages returns the texts of the chat messages the page shows, in order.
func messages(t *testing.T, page context.Context) []string {
	t.Helper()
	texts, err := chromedp.Run(page, chromedp.Evaluate[[]string](
		`[...document.querySelectorAll('#messages li.chat .text')].map(e => e.textContent)`))
	require.NoError(t, err)
	return texts
}

// waitMessages waits until the page shows exactly want: the list grows
// one message at a time, so a list that has all of want and anything more,
// or in another order, is a failure at once.
func waitMessages(t *testing.T, page context.Context, want []string) {
	t.Helper()
	deadline := time.Now().Add(wait)
	var got []string
	for time.Now().Before(deadline) {
		got = messages(t, page)
		if slices.Equal(got, want) {
			return
		}
		require.True(t, isPrefix(got, want), "the page shows %q; want %q", got, want)
		time.Sleep(50 * time.Millisecond)
	}
	status, _ := chromedp.Run(page, chromedp.Text(chromedp.CSS("#status")))
	t.Fatalf("after %v the page shows %q (status %q); want %q", wait, got, status, want)
}

// isPrefix reports whether got is want or its beginning.
func isPrefix(got, want []string) bool {
	return len(got) <= len(want) && slices.Equal(got, want[:len(got)])
}

// waitStatus waits until the page's status is state.
func waitStatus(t *testing.T, page context.Context, state string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(page, wait)
	defer cancel()
	require.NoError(t, chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS(`#status[data-state="`+state+`"]`))), "status %s", state)
}
