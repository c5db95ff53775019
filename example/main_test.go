package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho/internal/redistest"
)

// envOf is an environment holding exactly m, for run and loadConfig.
func envOf(m map[string]string) lookupEnv {
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

// startExample runs the app with env and returns its base URL.
func startExample(t *testing.T, env map[string]string) string {
	t.Helper()
	return startExampleLogging(t, env, io.Discard)
}

// startExampleLogging is startExample with the app's log written to w.
func startExampleLogging(t *testing.T, env map[string]string, w io.Writer) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	listening := make(chan string, 1)
	done := make(chan error, 1)
	env["ADDR"] = "127.0.0.1:0"
	logger := slog.New(slog.NewTextHandler(w, nil))
	go func() { done <- run(ctx, envOf(env), logger, listening) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err, "graceful shutdown")
		case <-time.After(15 * time.Second):
			t.Error("the app did not shut down")
		}
	})
	select {
	case addr := <-listening:
		return "http://" + addr
	case err := <-done:
		t.Fatalf("the app stopped: %v", err)
	}
	return ""
}

// startReady is startExample, then waitServing.
func startReady(t *testing.T, env map[string]string) string {
	t.Helper()
	base := startExample(t, env)
	waitServing(t, base, 10*time.Second)
	return base
}

// waitServing waits until the app at base serves in full: /health answers
// 200 only once the full app has replaced the boot app, so from then on no
// request meets the boot app's 503.
func waitServing(t *testing.T, base string, within time.Duration) {
	t.Helper()
	require.Eventually(t, func() bool {
		code, _ := status(t, base+"/health")
		return code == http.StatusOK
	}, within, 20*time.Millisecond)
	code, _ := status(t, base+"/no-such-page")
	require.Equal(t, http.StatusNotFound, code, "the full app serves once /health says so")
}

func status(t *testing.T, url string) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	resp, err := http.Get(url)
	require.NoError(t, err)
	_ = resp.Body.Close()
	return resp.StatusCode, time.Since(start)
}

// TestEmbeddedRedisDefault: with REDIS_URL unset the app needs no Redis
// installed, is ready at once and serves the whole app on the embedded
// miniredis: sessions, the cache and the limiters' scripts. The other
// behaviour tests run on real Redis.
func TestEmbeddedRedisDefault(t *testing.T) {
	base := startExample(t, map[string]string{"COOKIE_INSECURE": "1"})
	waitServing(t, base, 5*time.Second)
	code, _ := status(t, base+"/livez")
	require.Equal(t, http.StatusOK, code)

	c := newClient(t, base)
	code, _ = c.call(http.MethodPost, "/api/auth/login", `{"username":"alice","password":"wonderland"}`)
	require.Equal(t, http.StatusOK, code)
	code, body := c.call(http.MethodGet, "/profile", "")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "alice", body["username"])
	for _, want := range []string{"MISS", "HIT"} {
		code, h, _ := newClient(t, base).request(http.MethodGet, "/api/products/3", "") // no session cookie
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, want, h.Get("X-Cache"))
		require.True(t, strings.HasPrefix(h.Get("RateLimit"), `"100-per-1m";r=`), h.Get("RateLimit"))
	}
	code, h, _ := c.request(http.MethodGet, "/api/expensive-operation", "")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "9", h.Get("X-RateLimit-Remaining"))
}

// TestRedisDownAtStart: the app starts with Redis unreachable, answers
// readiness 503 within its deadline and liveness 200, and serves the full
// app without a restart once Redis answers.
func TestRedisDownAtStart(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, tp *redistest.Topology) {
		tp.StopServers()
		base := startExample(t, map[string]string{"REDIS_URL": tp.URL(), "COOKIE_INSECURE": "1", "SESSION_SECRET": strings.Repeat("n", 32) + "," + strings.Repeat("o", 32)})
		code, took := status(t, base+"/health")
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Less(t, took, 2*time.Second)
		code, _ = status(t, base+"/livez")
		require.Equal(t, http.StatusOK, code)
		c := newClient(t, base)
		code, body := c.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Equal(t, "starting: Redis is not reachable yet", body["error"])

		require.NoError(t, tp.StartServers())
		waitServing(t, base, 20*time.Second)
		code, _ = c.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code, "the full app, without a restart")
		code, body = c.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "alice", body["username"])
	})
}

func TestSessionKeyRing(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	k1, k2 := strings.Repeat("a", 32), strings.Repeat("b", 40)
	cfg, err := loadConfig(envOf(map[string]string{"SESSION_SECRET": " " + k1 + " , " + k2 + " ,"}), logger)
	require.NoError(t, err)
	require.Equal(t, []string{k1, k2}, cfg.sessionKeys)
	require.Equal(t, ":8080", cfg.addr)
	require.False(t, cfg.insecureCookie)
	cfg, err = loadConfig(envOf(nil), logger)
	require.NoError(t, err)
	require.Equal(t, []string{devSessionKey}, cfg.sessionKeys)
	_, err = loadConfig(envOf(map[string]string{"SESSION_SECRET": "short"}), logger)
	require.ErrorContains(t, err, "at least 32")
}

func TestBadRedisURL(t *testing.T) {
	err := run(context.Background(), envOf(map[string]string{"REDIS_URL": "http://nope", "ADDR": "127.0.0.1:0"}),
		slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	require.ErrorContains(t, err, "REDIS_URL")
}

// loggedIn returns a browser logged in as the demo user name (alice or
// bob).
func loggedIn(t *testing.T, base, name string) *client {
	t.Helper()
	c := newClient(t, base)
	pass := map[string]string{"alice": "wonderland", "bob": "builder"}[name]
	code, _ := c.call(http.MethodPost, "/login", fmt.Sprintf(`{"username":%q,"password":%q}`, name, pass))
	require.Equal(t, http.StatusOK, code, "login as %s", name)
	return c
}

// client is a browser with a cookie jar against the example.
type client struct {
	t    *testing.T
	base string
	hc   *http.Client
	// forwardedFor, when set, is sent as X-Forwarded-For, as a proxy on
	// the test's loopback address would (see TRUSTED_PROXIES).
	forwardedFor string
}

// newClient returns a browser with connections of its own, closed when the
// test ends: before the app shuts down, which waits up to 5 s for an opened
// connection that never sent a request (concurrent requests leave some).
func newClient(t *testing.T, base string) *client {
	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	hc := &http.Client{Jar: jar, Transport: http.DefaultTransport.(*http.Transport).Clone()}
	t.Cleanup(hc.CloseIdleConnections)
	return &client{t: t, base: base, hc: hc}
}

func (c *client) call(method, path, body string) (int, map[string]any) {
	c.t.Helper()
	code, _, out := c.request(method, path, body)
	return code, out
}

// raw is call with the body as text.
func (c *client) raw(method, path, body string) (int, string) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.base+path, strings.NewReader(body))
	require.NoError(c.t, err)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	return resp.StatusCode, string(b)
}

// request is call with the response's header.
func (c *client) request(method, path, body string) (int, http.Header, map[string]any) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.base+path, strings.NewReader(body))
	require.NoError(c.t, err)
	req.Header.Set("Content-Type", "application/json")
	if c.forwardedFor != "" {
		req.Header.Set("X-Forwarded-For", c.forwardedFor)
	}
	resp, err := c.hc.Do(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, resp.Header, out
}

// TestGuideSessionRoutes walks the guide's session routes: login, profile,
// logout, and the new sessions, logout-all and preferences routes.
func TestGuideSessionRoutes(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})

		alice := newClient(t, base)
		code, body := alice.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusUnauthorized, code)
		require.Equal(t, "Not authenticated", body["error"])

		code, body = alice.call(http.MethodPost, "/login", `{"username":"alice","password":"nope"}`)
		require.Equal(t, http.StatusUnauthorized, code)
		require.Equal(t, "Invalid credentials", body["error"])
		code, _ = alice.call(http.MethodPost, "/login", `{"username":`)
		require.Equal(t, http.StatusBadRequest, code)

		code, body = alice.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "Login successful", body["message"])
		code, body = alice.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"userId": float64(1), "username": "alice"}, body)

		phone := newClient(t, base)
		code, _ = phone.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code)
		code, body = alice.call(http.MethodGet, "/sessions", "")
		require.Equal(t, http.StatusOK, code)
		list := body["sessions"].([]any)
		require.Len(t, list, 2)
		currents := 0
		for _, s := range list {
			if s.(map[string]any)["current"] == true {
				currents++
			}
		}
		require.Equal(t, 1, currents)

		// Preferences: anonymous visitors too, and per-value merges.
		anon := newClient(t, base)
		code, body = anon.call(http.MethodPut, "/preferences", `{"theme":"dark"}`)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"theme": "dark"}, body)
		code, body = anon.call(http.MethodPut, "/preferences", `{"lang":"fr"}`)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"theme": "dark", "lang": "fr"}, body)
		code, _ = anon.call(http.MethodPut, "/preferences", `["not","an","object"]`)
		require.Equal(t, http.StatusBadRequest, code)
		code, _ = anon.call(http.MethodPut, "/preferences", `{"`+strings.Repeat("x", 65)+`":"v"}`)
		require.Equal(t, http.StatusBadRequest, code)
		code, body = anon.call(http.MethodGet, "/preferences", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"theme": "dark", "lang": "fr"}, body)

		code, body = phone.call(http.MethodPost, "/logout-all", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, float64(2), body["ended"])
		code, _ = alice.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusUnauthorized, code, "logged out everywhere")
		code, _ = phone.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusUnauthorized, code)

		code, _ = alice.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code)
		code, body = alice.call(http.MethodPost, "/logout", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "Logged out", body["message"])
		code, _ = alice.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusUnauthorized, code)
	})
}

// TestPreferencesFromTwoTabs: two tabs changing different preferences at
// the same time both keep their change.
func TestPreferencesFromTwoTabs(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		browser := newClient(t, base)
		code, _ := browser.call(http.MethodPut, "/preferences", `{"seed":"1"}`)
		require.Equal(t, http.StatusOK, code)
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Go(func() {
				code, _ := browser.call(http.MethodPut, "/preferences", fmt.Sprintf(`{"tab%d":"v%d"}`, i, i))
				assert.Equal(t, http.StatusOK, code)
			})
		}
		wg.Wait()
		code, body := browser.call(http.MethodGet, "/preferences", "")
		require.Equal(t, http.StatusOK, code)
		require.Len(t, body, 21, "every tab's preference was kept: %v", body)
	})
}

// TestGuideCacheRoutes: the guide's cached routes.
func TestGuideCacheRoutes(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		get := func(path string) (int, string, string) {
			resp, err := http.Get(base + path)
			require.NoError(t, err)
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp.StatusCode, resp.Header.Get("X-Cache"), string(b)
		}
		admin := loggedIn(t, base, "alice")
		put := func(path, body string) (int, string) {
			return admin.raw(http.MethodPut, path, body)
		}
		code, xc, body := get("/api/products")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "MISS", xc)
		var list []map[string]any
		require.NoError(t, json.Unmarshal([]byte(body), &list))
		require.Len(t, list, 20)
		_, xc, _ = get("/api/products")
		require.Equal(t, "HIT", xc)
		_, xc, _ = get("/api/products/7")
		require.Equal(t, "MISS", xc)
		_, xc, _ = get("/api/products/7")
		require.Equal(t, "HIT", xc)

		code, xc, _ = get("/api/products/99")
		require.Equal(t, http.StatusNotFound, code)
		require.Equal(t, "MISS", xc)
		code, xc, _ = get("/api/products/99")
		require.Equal(t, http.StatusNotFound, code)
		require.Equal(t, "HIT", xc, "404s are negative-cached")

		code, xc, body = get("/api/users/1")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "MISS", xc)
		require.Contains(t, body, "alice")
		_, xc, _ = get("/api/users/1")
		require.Equal(t, "HIT", xc)

		code, _ = put("/api/products/7", `{"price": 1.5}`)
		require.Equal(t, http.StatusOK, code)
		code, xc, body = get("/api/products/7")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "MISS", xc, "the update invalidated the product")
		require.Contains(t, body, `"price":1.5`)
		_, xc, body = get("/api/products")
		require.Equal(t, "MISS", xc, "and the list")
		require.Contains(t, body, `"price":1.5`)
		_, xc, _ = get("/api/products/8")
		require.Equal(t, "MISS", xc, "product 8 was never cached")
		_, xc, _ = get("/api/products/8")
		require.Equal(t, "HIT", xc)
		code, _ = put("/api/products/7", `{"name": "Renamed"}`)
		require.Equal(t, http.StatusOK, code)
		_, xc, _ = get("/api/products/8")
		require.Equal(t, "HIT", xc, "other products stay cached")

		code, body = put("/api/products/7", `{"price": "free"}`)
		require.Equal(t, http.StatusBadRequest, code)
		require.Contains(t, body, `"error"`)
		code, _ = put("/api/products/7", `not json`)
		require.Equal(t, http.StatusBadRequest, code)
		code, body = put("/api/products/99", `{"price": 1}`)
		require.Equal(t, http.StatusNotFound, code)
		require.Contains(t, body, "Product not found")
	})
}

// clearOfMinuteEnd waits for the next minute when this one ends within 5 s.
// The /api limiter's sliding-window counter is exact for a burst that fits
// in one aligned minute; a burst across the boundary may get a request or
// two more. The test servers run on this machine: Redis's TIME is this
// process's clock.
func clearOfMinuteEnd(t *testing.T) {
	t.Helper()
	now := time.Now()
	if next := now.Truncate(time.Minute).Add(time.Minute); next.Sub(now) < 5*time.Second {
		time.Sleep(next.Sub(now) + 10*time.Millisecond)
	}
}

// TestAPIRateLimit: the guide's apiLimiter, 100 requests per minute per
// client IP on every /api route, cache hits included. The test is the
// trusted proxy (TRUSTED_PROXIES=127.0.0.1): each client's address is the
// X-Forwarded-For it sends.
func TestAPIRateLimit(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "TRUSTED_PROXIES": "127.0.0.1"})
		clearOfMinuteEnd(t)

		ips := newClientIPs()
		a := newClient(t, base)
		a.forwardedFor = ips.ip()
		for i := range 100 {
			code, h, _ := a.request(http.MethodGet, "/api/products", "")
			require.Equal(t, http.StatusOK, code, "request %d", i+1)
			require.Equal(t, `"100-per-1m";q=100;w=60`, h.Get("RateLimit-Policy"))
			require.True(t, strings.HasPrefix(h.Get("RateLimit"), fmt.Sprintf(`"100-per-1m";r=%d;t=`, 99-i)), "request %d: RateLimit %q", i+1, h.Get("RateLimit"))
			require.Empty(t, h.Get("X-RateLimit-Limit"), "the guide's legacyHeaders: false")
			if i > 0 {
				require.Equal(t, "HIT", h.Get("X-Cache"), "cache hits count too")
			}
		}
		code, h, body := a.request(http.MethodGet, "/api/products", "")
		require.Equal(t, http.StatusTooManyRequests, code, "the 101st request within the minute")
		require.Equal(t, map[string]any{"error": "Too many requests, please try again later."}, body)
		retry, err := strconv.Atoi(h.Get("Retry-After"))
		require.NoError(t, err)
		// Up to a minute and a hundredth of one (rounded up): the sliding-window
		// counter admits again once the end of this minute and then the
		// fading weight of its 100 requests leave room for one more.
		require.True(t, retry >= 1 && retry <= 61, "Retry-After %d", retry)
		require.Equal(t, `"100-per-1m";q=100;w=60`, h.Get("RateLimit-Policy"))
		require.True(t, strings.HasPrefix(h.Get("RateLimit"), `"100-per-1m";r=0;t=`), h.Get("RateLimit"))
		require.Empty(t, h.Get("X-Cache"), "refused before the cache")

		// Every /api route shares the client's count; routes outside /api do not.
		for _, r := range []struct{ method, path, body string }{
			{http.MethodGet, "/api/users/1", ""},
			{http.MethodPut, "/api/products/1", `{"price": 1}`},
			{http.MethodGet, "/api/expensive-operation", ""},
			{http.MethodPost, "/api/auth/login", `{"username":"alice","password":"wonderland"}`},
			{http.MethodGet, "/api/no-such-route", ""},
		} {
			code, _, body := a.request(r.method, r.path, r.body)
			require.Equal(t, http.StatusTooManyRequests, code, "%s %s", r.method, r.path)
			require.Equal(t, "Too many requests, please try again later.", body["error"])
		}
		code, _ = a.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code, "outside /api")

		b := newClient(t, base)
		b.forwardedFor = ips.ip()
		code, h, _ = b.request(http.MethodGet, "/api/products", "")
		require.Equal(t, http.StatusOK, code, "another client is unaffected")
		require.True(t, strings.HasPrefix(h.Get("RateLimit"), `"100-per-1m";r=99;t=`), h.Get("RateLimit"))
	})
}

// TestAPIRateLimitIgnoresForgedForwardedFor: with no TRUSTED_PROXIES the
// client is the connection's peer; an X-Forwarded-For of its own choosing
// does not give it a fresh count.
func TestAPIRateLimitIgnoresForgedForwardedFor(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		clearOfMinuteEnd(t)
		ips := newClientIPs()
		c := newClient(t, base)
		for i := range 100 {
			c.forwardedFor = ips.ip()
			code, _, _ := c.request(http.MethodGet, "/api/users/2", "")
			require.Equal(t, http.StatusOK, code, "request %d", i+1)
		}
		c.forwardedFor = ips.ip()
		code, _, _ := c.request(http.MethodGet, "/api/users/2", "")
		require.Equal(t, http.StatusTooManyRequests, code)
	})
}

// TestLoginRateLimit: the guide's authLimiter on POST /api/auth/login, 5
// failed attempts per 15 minutes per client IP; successful logins are not
// counted.
func TestLoginRateLimit(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "TRUSTED_PROXIES": "127.0.0.1"})
		const right, wrong = `{"username":"alice","password":"wonderland"}`, `{"username":"alice","password":"nope"}`

		ips := newClientIPs()
		alice := newClient(t, base)
		alice.forwardedFor = ips.ip()
		for i := range 10 {
			code, h, body := alice.request(http.MethodPost, "/api/auth/login", right)
			require.Equal(t, http.StatusOK, code, "login %d", i+1)
			require.Equal(t, "Login successful", body["message"])
			require.Equal(t, "4", h.Get("X-RateLimit-Remaining"), "login %d: the ones before were given back", i+1)
			require.Equal(t, `"100-per-1m";q=100;w=60, "5-per-15m-fixed-window";q=5;w=900`, strings.Join(h.Values("RateLimit-Policy"), ", "), "both limiters list their policies")
		}
		// It logs in as POST /login does: the session cookie, the profile.
		code, body := alice.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"userId": float64(1), "username": "alice"}, body)

		for i := range 5 {
			code, h, body := alice.request(http.MethodPost, "/api/auth/login", wrong)
			require.Equal(t, http.StatusUnauthorized, code, "failure %d", i+1)
			require.Equal(t, "Invalid credentials", body["error"])
			require.Equal(t, strconv.Itoa(4-i), h.Get("X-RateLimit-Remaining"), "failure %d: the 10 successes left the count at 0", i+1)
		}
		code, h, body := alice.request(http.MethodPost, "/api/auth/login", right)
		require.Equal(t, http.StatusTooManyRequests, code, "the 6th attempt, right credentials or not")
		require.Equal(t, map[string]any{"error": "Too many login attempts, please try again later."}, body)
		retry, err := strconv.Atoi(h.Get("Retry-After"))
		require.NoError(t, err)
		require.True(t, retry > 14*60 && retry <= 15*60, "Retry-After %d: the window started with the first attempt", retry)
		require.Contains(t, strings.Join(h.Values("RateLimit"), ", "), `"5-per-15m-fixed-window";r=0;t=`)
		require.Empty(t, h.Values("Set-Cookie"), "refused before the session")
		code, _ = alice.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code, "the session from before is untouched")

		bob := newClient(t, base)
		bob.forwardedFor = ips.ip()
		code, _, _ = bob.request(http.MethodPost, "/api/auth/login", `{"username":"bob","password":"builder"}`)
		require.Equal(t, http.StatusOK, code, "another client IP is unaffected")
		code, body = bob.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "bob", body["username"])
	})
}

// TestExpensiveOperationRateLimit: the guide's custom sliding-window limiter
// on GET /api/expensive-operation, 10 per minute per logged-in user, or per
// client IP for anonymous visitors.
func TestExpensiveOperationRateLimit(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "TRUSTED_PROXIES": "127.0.0.1"})
		exhaust := func(c *client, who string) {
			t.Helper()
			for i := range 10 {
				code, h, body := c.request(http.MethodGet, "/api/expensive-operation", "")
				require.Equal(t, http.StatusOK, code, "%s: request %d", who, i+1)
				require.Equal(t, map[string]any{"result": "done"}, body)
				require.Equal(t, strconv.Itoa(9-i), h.Get("X-RateLimit-Remaining"), "%s: request %d", who, i+1)
			}
			code, h, body := c.request(http.MethodGet, "/api/expensive-operation", "")
			require.Equal(t, http.StatusTooManyRequests, code, "%s: the 11th request", who)
			require.Equal(t, map[string]any{"error": "Too many requests"}, body)
			retry, err := strconv.Atoi(h.Get("Retry-After"))
			require.NoError(t, err)
			require.True(t, retry >= 1 && retry <= 60, "%s: Retry-After %d", who, retry)
			require.Equal(t, `"100-per-1m";q=100;w=60, "10-per-1m-sliding-log";q=10;w=60`, strings.Join(h.Values("RateLimit-Policy"), ", "))
		}
		expensive := func(c *client) int {
			t.Helper()
			code, _, _ := c.request(http.MethodGet, "/api/expensive-operation", "")
			return code
		}

		// Alice, Bob and the anonymous visitors all come from one address.
		ips := newClientIPs()
		here := ips.ip()
		visitor := func() *client {
			c := newClient(t, base)
			c.forwardedFor = here
			return c
		}
		alice, bob, anon := visitor(), visitor(), visitor()
		code, _ := alice.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code)
		code, _ = bob.call(http.MethodPost, "/api/auth/login", `{"username":"bob","password":"builder"}`)
		require.Equal(t, http.StatusOK, code)

		exhaust(alice, "alice")
		require.Equal(t, http.StatusOK, expensive(bob), "counted per user, not per IP")
		exhaust(anon, "anonymous") // a count of its own, though from alice's IP
		require.Equal(t, http.StatusTooManyRequests, expensive(visitor()), "anonymous visitors count by IP")
		stranger := newClient(t, base)
		stranger.forwardedFor = ips.ip()
		require.Equal(t, http.StatusOK, expensive(stranger), "another IP")
		require.Equal(t, http.StatusOK, expensive(bob))

		code, _ = alice.call(http.MethodPost, "/logout", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, http.StatusTooManyRequests, expensive(alice), "logged out, alice counts under her IP, used up")
	})
}

// TestTrustedProxies: who the client is, for the rate limiters, with and
// without proxies in front of the app.
func TestTrustedProxies(t *testing.T) {
	tests := []struct {
		name   string
		given  string // TRUSTED_PROXIES
		remote string
		xff    string
		want   string
	}{
		{name: "direct: X-Forwarded-For is ignored", remote: "203.0.113.9:1234", xff: "198.51.100.1", want: "203.0.113.9"},
		{name: "direct: private peers are not trusted either", remote: "10.0.0.2:1234", xff: "198.51.100.1", want: "10.0.0.2"},
		{name: "trusted proxy", given: "10.0.0.0/8", remote: "10.1.2.3:1234", xff: "198.51.100.1", want: "198.51.100.1"},
		{name: "trusted proxy, no header", given: "10.0.0.0/8", remote: "10.1.2.3:1234", want: "10.1.2.3"},
		{name: "untrusted peer: only the listed proxies count, not every private address", given: "10.0.0.0/8", remote: "192.168.1.2:1234", xff: "198.51.100.1", want: "192.168.1.2"},
		{name: "chain: the nearest untrusted hop, not a forged first one", given: " 10.0.0.0/8 , 127.0.0.1 ", remote: "127.0.0.1:1234", xff: "6.6.6.6, 198.51.100.1, 10.0.0.5", want: "198.51.100.1"},
		{name: "IPv6 proxy", given: "::1", remote: "[::1]:1234", xff: "2001:db8::1", want: "2001:db8::1"},
		{name: "IPv4-mapped proxy address", given: "::ffff:127.0.0.1", remote: "127.0.0.1:1234", xff: "198.51.100.1", want: "198.51.100.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := loadConfig(envOf(map[string]string{"TRUSTED_PROXIES": tt.given}), slog.New(slog.NewTextHandler(io.Discard, nil)))
			require.NoError(t, err)
			req := httptest.NewRequest(http.MethodGet, "/", nil)
			req.RemoteAddr = tt.remote
			if tt.xff != "" {
				req.Header.Set("X-Forwarded-For", tt.xff)
			}
			require.Equal(t, tt.want, cfg.ipExtractor()(req))
		})
	}
}

func TestRateLimitConfig(t *testing.T) {
	load := func(env map[string]string) (config, error) {
		return loadConfig(envOf(env), slog.New(slog.NewTextHandler(io.Discard, nil)))
	}
	cfg, err := load(nil)
	require.NoError(t, err)
	require.Equal(t, 1.0, cfg.fallbackShare, "one instance")
	require.Empty(t, cfg.trustedProxies)
	cfg, err = load(map[string]string{"RATE_LIMIT_FALLBACK_SHARE": "0.25"})
	require.NoError(t, err)
	require.Equal(t, 0.25, cfg.fallbackShare)
	for _, v := range []string{"0", "-0.5", "1.5", "NaN", "a quarter"} {
		_, err = load(map[string]string{"RATE_LIMIT_FALLBACK_SHARE": v})
		require.ErrorContains(t, err, "RATE_LIMIT_FALLBACK_SHARE", v)
	}
	for _, v := range []string{"proxy.internal", "10.0.0.0/33", "10.0.0.1-10.0.0.9"} {
		_, err = load(map[string]string{"TRUSTED_PROXIES": v})
		require.ErrorContains(t, err, "TRUSTED_PROXIES", v)
	}
}

// TestRateLimitsWhenRedisDown: each limiter's OnRedisError. The /api
// limiter fails open, the login limiter fails closed, and the expensive
// operation's limiter decides in memory with this instance's share.
func TestRateLimitsWhenRedisDown(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, tp *redistest.Topology) {
		logger := slog.New(slog.NewTextHandler(io.Discard, nil))
		cfg, err := loadConfig(envOf(map[string]string{"REDIS_URL": tp.URL(), "COOKIE_INSECURE": "1", "RATE_LIMIT_FALLBACK_SHARE": "0.5"}), logger)
		require.NoError(t, err)
		opt, stopRedis, err := redisOption(cfg, logger)
		require.NoError(t, err)
		defer stopRedis()
		rc, err := rueidis.NewClient(opt)
		require.NoError(t, err)
		defer rc.Close()
		app, err := newApp(rc, cfg, logger)
		require.NoError(t, err)
		srv := httptest.NewServer(app)
		defer srv.Close()

		c := newClient(t, srv.URL)
		code, _ := c.call(http.MethodGet, "/api/users/1", "")
		require.Equal(t, http.StatusOK, code)
		tp.StopServers()

		for i := range 3 {
			code, _ := c.call(http.MethodGet, "/api/users/1", "")
			require.Equal(t, http.StatusOK, code, "request %d: /api fails open (and the cache steps aside)", i+1)
		}
		code, body := c.call(http.MethodPost, "/api/auth/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusServiceUnavailable, code, "login fails closed")
		require.Equal(t, "Service temporarily unavailable, please try again later.", body["error"])
		code, _ = c.call(http.MethodPost, "/api/auth/login", `{"username":"alice","password":"nope"}`)
		require.Equal(t, http.StatusServiceUnavailable, code, "right or wrong password alike")
		for i := range 5 {
			code, body := c.call(http.MethodGet, "/api/expensive-operation", "")
			require.Equal(t, http.StatusOK, code, "request %d", i+1)
			require.Equal(t, "done", body["result"])
		}
		code, _ = c.call(http.MethodGet, "/api/expensive-operation", "")
		require.Equal(t, http.StatusTooManyRequests, code, "half of 10 on this instance while Redis is down")
	})
}
