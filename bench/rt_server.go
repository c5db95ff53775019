package main

// rt-server: one realtime server process. Kinds: "redisecho" (Echo +
// redisecho Hub + SSEWithConfig on /events, as the example app mounts it;
// rt_redisecho.go), "bare" (an Echo SSE handler that only holds the stream
// open: the floor a stream costs in net/http + Echo) and "centrifuge"
// (centrifugal/centrifuge with its Redis broker, WebSocket on
// /connection/websocket; rt_centrifuge.go).
//
// Requests: "mem" (runtime.MemStats after a GC, the goroutine count and,
// with -memprofilerate, the in-use heap by allocation site), "cpu" (its
// getrusage user + system time), "stats" (the hub's Stats, when it has
// one), "cpuprofile-start"/"cpuprofile-stop".

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"regexp"
	"runtime"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/labstack/echo/v4"
)

// serverConfig is what every server kind is built from.
type serverConfig struct {
	Redis  string // address of the Redis server
	Prefix string // key prefix of this run
}

// serverApp is a built server: its handler, its stats, how it stops.
type serverApp struct {
	Handler  http.Handler
	Stats    func() any                      // nil: none
	Shutdown func(ctx context.Context) error // ends every stream; nil: none
	Close    func()                          // releases clients after Shutdown; nil: none
	// Timeouts: use the example app's server timeouts (the SSE stream must
	// clear them itself). False for WebSocket servers, which set their own
	// deadlines per frame.
	Timeouts bool
}

// serverKinds builds each kind; rt_redisecho.go and rt_centrifuge.go add
// theirs.
var serverKinds = map[string]func(serverConfig) (*serverApp, error){
	"bare": newBareServer,
}

// serverReady is rt-server's first reply.
type serverReady struct {
	Addr string `json:"addr"` // host:port it listens on
	Pid  int    `json:"pid"`
}

// memReport is the reply to "mem".
type memReport struct {
	HeapInuse   uint64           `json:"heapInuse"`
	StackInuse  uint64           `json:"stackInuse"`
	HeapObjects uint64           `json:"heapObjects"`
	Goroutines  int              `json:"goroutines"`
	Sites       map[string]int64 `json:"sites,omitempty"`  // in-use bytes by allocation site (estimated from the sampled profile)
	Parked      map[string]int   `json:"parked,omitempty"` // goroutines by where they wait (their innermost non-runtime frame)
}

func serverMain(args []string) error {
	fs := flag.NewFlagSet("rt-server", flag.ContinueOnError)
	kind := fs.String("kind", "redisecho", "server kind: "+strings.Join(serverKindNames(), ", "))
	redisAddr := fs.String("redis", "", "Redis address")
	prefix := fs.String("prefix", "bench:rt:", "key prefix")
	memRate := fs.Int("memprofilerate", 0, "runtime.MemProfileRate (0: the default); set for a heap breakdown")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *memRate > 0 {
		runtime.MemProfileRate = *memRate
	}
	if err := raiseFileLimit(); err != nil {
		return fmt.Errorf("RLIMIT_NOFILE: %w", err)
	}
	build := serverKinds[*kind]
	if build == nil {
		return fmt.Errorf("unknown -kind %q (have %s)", *kind, strings.Join(serverKindNames(), ", "))
	}
	app, err := build(serverConfig{Redis: *redisAddr, Prefix: *prefix})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: app.Handler, ReadHeaderTimeout: 5 * time.Second}
	if app.Timeouts {
		// The example app's defaults (example/main.go defaultTimeouts).
		srv.ReadTimeout, srv.WriteTimeout, srv.IdleTimeout = 15*time.Second, 30*time.Second, time.Minute
	}
	if app.Shutdown != nil {
		srv.RegisterOnShutdown(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = app.Shutdown(ctx)
		})
	}
	go func() { _ = srv.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		if app.Close != nil {
			app.Close()
		}
	}()

	var profile *os.File
	defer func() {
		if profile != nil {
			pprof.StopCPUProfile()
			profile.Close()
		}
	}()
	rate := runtime.MemProfileRate
	return serveRequests(serverReady{Addr: ln.Addr().String(), Pid: os.Getpid()}, func(op string, raw json.RawMessage) (any, error) {
		switch op {
		case "mem":
			return readMem(*memRate > 0, rate), nil
		case "cpu":
			return struct{ CPUNanos int64 }{processCPU()}, nil
		case "stats":
			if app.Stats == nil {
				return nil, nil
			}
			return app.Stats(), nil
		case "cpuprofile-start":
			var a struct{ Path string }
			if err := decodeArgs(raw, &a); err != nil {
				return nil, err
			}
			if profile != nil {
				return nil, errors.New("a CPU profile is already running")
			}
			f, err := os.Create(a.Path)
			if err != nil {
				return nil, err
			}
			if err := pprof.StartCPUProfile(f); err != nil {
				f.Close()
				return nil, err
			}
			profile = f
			return nil, nil
		case "cpuprofile-stop":
			if profile == nil {
				return nil, errors.New("no CPU profile is running")
			}
			pprof.StopCPUProfile()
			err := profile.Close()
			profile = nil
			return nil, err
		}
		return nil, fmt.Errorf("unknown op %q", op)
	})
}

// processCPU is this process's user + system CPU time, in nanoseconds.
func processCPU() int64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func serverKindNames() []string {
	var names []string
	for k := range serverKinds {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// readMem collects garbage twice (the second pass frees what finalizers
// released) and reads the memory figures.
func readMem(sites bool, rate int) memReport {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r := memReport{HeapInuse: ms.HeapInuse, StackInuse: ms.StackInuse, HeapObjects: ms.HeapObjects, Goroutines: runtime.NumGoroutine()}
	if sites {
		r.Sites = heapSites(rate)
		r.Parked = parkedGoroutines()
	}
	return r
}

// parkedGoroutines counts goroutines by their innermost frame outside the
// runtime and the packages that only wait (sync, time, internal/poll...).
func parkedGoroutines() map[string]int {
	var recs []runtime.StackRecord
	n, _ := runtime.GoroutineProfile(nil)
	for {
		recs = make([]runtime.StackRecord, n+64)
		var ok bool
		n, ok = runtime.GoroutineProfile(recs)
		if ok {
			recs = recs[:n]
			break
		}
	}
	parked := map[string]int{}
	for i := range recs {
		name := "runtime"
		frames := runtime.CallersFrames(recs[i].Stack())
		for {
			f, more := frames.Next()
			if !waitFrame(f.Function) {
				name = shortFunc(f.Function)
				break
			}
			if !more {
				break
			}
		}
		parked[name]++
	}
	return parked
}

func waitFrame(fn string) bool {
	for _, p := range []string{"runtime.", "internal/", "sync.", "time.", "net.", "bufio.", "io.", "crypto/tls."} {
		if strings.HasPrefix(fn, p) {
			return true
		}
	}
	return false
}

// heapSites sums the in-use bytes of the heap profile (as of the last GC)
// by allocation site: the innermost frame in a package that owns the
// memory (redisecho, Echo, net/http, rueidis, centrifuge, gorilla, bufio
// callers...), so that "bufio.NewReaderSize" shows as the net/http
// function that asked for it. Samples are scaled as pprof does.
func heapSites(rate int) map[string]int64 {
	var recs []runtime.MemProfileRecord
	n, _ := runtime.MemProfile(nil, true)
	for {
		recs = make([]runtime.MemProfileRecord, n+64)
		var ok bool
		n, ok = runtime.MemProfile(recs, true)
		if ok {
			recs = recs[:n]
			break
		}
	}
	sites := map[string]int64{}
	for i := range recs {
		r := &recs[i]
		inuse := r.InUseBytes()
		if inuse <= 0 || r.AllocObjects == 0 {
			continue
		}
		scale := 1.0
		if rate > 1 {
			avg := float64(r.AllocBytes) / float64(r.AllocObjects)
			scale = 1 / (1 - math.Exp(-avg/float64(rate)))
		}
		sites[siteOf(r.Stack())] += int64(float64(inuse) * scale)
	}
	return sites
}

// siteOwners are the package path prefixes a site is attributed to.
var siteOwners = []string{
	"github.com/redisecho/", "github.com/labstack/", "net/http.", "github.com/redis/rueidis",
	"github.com/centrifugal/", "github.com/gorilla/", "main.",
}

func siteOf(stack []uintptr) string {
	frames := runtime.CallersFrames(stack)
	leaf := ""
	for {
		f, more := frames.Next()
		if leaf == "" && !strings.HasPrefix(f.Function, "runtime.") {
			leaf = f.Function
		}
		for _, p := range siteOwners {
			if strings.HasPrefix(f.Function, p) {
				return shortFunc(f.Function)
			}
		}
		if !more {
			break
		}
	}
	if leaf == "" {
		return "runtime"
	}
	return shortFunc(leaf)
}

// shortFunc drops a function's module path: "net/http.(*conn).serve",
// "redisecho.(*Hub).Serve", "echo/v4.(*context).QueryParam".
func shortFunc(fn string) string {
	if strings.HasPrefix(fn, "net/http.") {
		return fn
	}
	i := strings.LastIndex(fn, "/")
	if i < 0 {
		return fn
	}
	if j := strings.LastIndex(fn[:i], "/"); j >= 0 && majorVersion.MatchString(fn[i+1:]) {
		return fn[j+1:]
	}
	return fn[i+1:]
}

var majorVersion = regexp.MustCompile(`^v[0-9]+\.`)

// newBareServer: Echo with one SSE handler that writes the headers and the
// first bytes redisecho writes, flushes, clears the server's deadlines and
// sends a heartbeat every 15 s until the client leaves. What any SSE
// stream costs in net/http and Echo before the library adds its own.
func newBareServer(serverConfig) (*serverApp, error) {
	e := newEcho()
	e.GET("/events", func(c echo.Context) error {
		w := c.Response()
		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Accel-Buffering", "no")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Time{})
		_ = rc.SetWriteDeadline(time.Time{})
		if _, err := w.Write([]byte("retry: 3000\n: connected\n\n")); err != nil {
			return nil
		}
		w.Flush()
		t := time.NewTicker(15 * time.Second)
		defer t.Stop()
		ctx := c.Request().Context()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
				if _, err := w.Write([]byte(": hb\n\n")); err != nil {
					return nil
				}
				w.Flush()
			}
		}
	})
	return &serverApp{Handler: e, Timeouts: true}, nil
}

// newEcho is an Echo instance as the example app has it, without a logger
// (the bench measures the library, not log writes).
func newEcho() *echo.Echo {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	return e
}
