package otelredisecho

// The observer's cost on the hot paths, as benchmarks (never a timed test):
//
//	go test -run '^$' -bench Overhead -benchmem -count 10 . | tee /tmp/overhead.txt
//	go run golang.org/x/perf/cmd/benchstat -col /observer /tmp/overhead.txt
//
// Each case runs a real request through an Echo app on the suite's
// standalone Redis, with no observer ("none") and with this bridge over an
// SDK meter provider with a manual reader ("otel"). OVERHEAD_NOOBS=1 gives
// the "otel" app no observer: the check that the two apps differ in
// nothing else.

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/redisecho/redisecho"
	"github.com/redisecho/redisecho/internal/redistest"
)

var standalone, cluster *redistest.Topology

func TestMain(m *testing.M) {
	os.Exit(redistest.Run(m, func(s, c *redistest.Topology) { standalone, cluster = s, c }))
}

// newClient returns a client of tp, closed when tb ends.
func newClient(tb testing.TB, tp *redistest.Topology) rueidis.Client {
	tb.Helper()
	opt, err := rueidis.ParseURL(tp.URL())
	require.NoError(tb, err)
	c, err := rueidis.NewClient(opt)
	require.NoError(tb, err)
	tb.Cleanup(c.Close)
	return c
}

// uniquePrefix returns a brace-free prefix of tb's own, whose keys are
// deleted when tb ends.
func uniquePrefix(tb testing.TB, tp *redistest.Topology) string {
	tb.Helper()
	p := "t:otel:" + time.Now().Format("150405.000000000") + ":"
	tb.Cleanup(func() { _, _ = tp.DeleteKeys(p) })
	return p
}

const sessionKey = "an-hmac-key-of-at-least-32-bytes-for-the-benchmark"

func BenchmarkOverhead(b *testing.B) {
	// Both apps are built first, then each path runs without and with the
	// observer back to back, so that drift in the machine or in Redis hits
	// both alike.
	type app struct {
		e      *echo.Echo
		cookie *http.Cookie
	}
	apps := map[string]app{}
	for _, obsName := range []string{"none", "otel"} {
		var obs redisecho.Observer
		if obsName == "otel" && os.Getenv("OVERHEAD_NOOBS") == "" {
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
			b.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
			o, err := New(Config{MeterProvider: mp, TracerProvider: noop.NewTracerProvider()})
			require.NoError(b, err)
			obs = o
		}
		// A client per observer: the shared breaker takes the first
		// feature's observer.
		client := newClient(b, standalone)
		opts := redisecho.Options{Prefix: uniquePrefix(b, standalone), Observer: obs}
		e := echo.New()
		ok := func(c echo.Context) error { return c.String(http.StatusOK, "ok") }

		sessions, err := redisecho.SessionConfig{Client: client, Options: opts, Keys: []string{sessionKey}}.ToMiddleware()
		require.NoError(b, err)
		e.POST("/login", func(c echo.Context) error {
			s, err := redisecho.GetSession(c)
			if err != nil {
				return err
			}
			return s.Set("user", "alice")
		}, sessions)
		e.GET("/session", func(c echo.Context) error {
			s, err := redisecho.GetSession(c)
			if err != nil {
				return err
			}
			if u, _ := s.GetString("user"); u != "alice" {
				return c.NoContent(http.StatusUnauthorized)
			}
			return ok(c)
		}, sessions)
		cache, err := redisecho.CacheConfig{Client: client, Options: opts, TTL: time.Hour}.ToMiddleware()
		require.NoError(b, err)
		e.GET("/cached", ok, cache)
		limit, err := redisecho.RateLimitConfig{Client: client, Options: opts, Name: "bench",
			Policies: []redisecho.Policy{redisecho.PerSecond(1 << 40)}}.ToMiddleware()
		require.NoError(b, err)
		e.GET("/limited", ok, limit)

		rec := httptest.NewRecorder()
		e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/login", nil))
		require.Equal(b, http.StatusOK, rec.Code)
		apps[obsName] = app{e: e, cookie: rec.Result().Cookies()[0]}
	}

	for _, path := range []string{"/session", "/cached", "/limited"} {
		name := map[string]string{"/session": "SessionRead", "/cached": "CacheHit", "/limited": "LimiterAllowed"}[path]
		for _, obsName := range []string{"none", "otel"} {
			a := apps[obsName]
			b.Run("path="+name+"/observer="+obsName, func(b *testing.B) {
				req := httptest.NewRequest(http.MethodGet, path, nil)
				req.AddCookie(a.cookie)
				req.RemoteAddr = "192.0.2.1:1234"
				for range 3 { // warm: the cache fills, the session is cached
					rec := httptest.NewRecorder()
					a.e.ServeHTTP(rec, req)
					require.Equal(b, http.StatusOK, rec.Code, path)
				}
				b.ReportAllocs()
				for b.Loop() {
					rec := httptest.NewRecorder()
					a.e.ServeHTTP(rec, req)
					if rec.Code != http.StatusOK {
						b.Fatal(path, rec.Code)
					}
				}
			})
		}
	}
}
