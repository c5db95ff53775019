package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/cookiejar"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// startExample runs the app with env and returns its base URL.
func startExample(t *testing.T, env map[string]string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	listening := make(chan string, 1)
	done := make(chan error, 1)
	env["ADDR"] = "127.0.0.1:0"
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	go func() { done <- run(ctx, func(k string) string { return env[k] }, logger, listening) }()
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

func status(t *testing.T, url string) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	resp, err := http.Get(url)
	require.NoError(t, err)
	_ = resp.Body.Close()
	return resp.StatusCode, time.Since(start)
}

// TestEmbeddedRedisDefault: with REDIS_URL unset the app needs no Redis
// installed and is ready at once.
func TestEmbeddedRedisDefault(t *testing.T) {
	base := startExample(t, map[string]string{})
	require.Eventually(t, func() bool { code, _ := status(t, base+"/health"); return code == http.StatusOK }, 5*time.Second, 20*time.Millisecond)
	code, _ := status(t, base+"/livez")
	require.Equal(t, http.StatusOK, code)
}

// TestRedisDownAtStart: the app starts with Redis unreachable, answers
// readiness 503 within its deadline and liveness 200.
func TestRedisDownAtStart(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())

	base := startExample(t, map[string]string{"REDIS_URL": "redis://" + addr, "SESSION_SECRET": strings.Repeat("n", 32) + "," + strings.Repeat("o", 32)})
	code, took := status(t, base+"/health")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Less(t, took, 2*time.Second)
	code, _ = status(t, base+"/livez")
	require.Equal(t, http.StatusOK, code)
}

func TestSessionKeyRing(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	k1, k2 := strings.Repeat("a", 32), strings.Repeat("b", 40)
	cfg, err := loadConfig(func(k string) string { return map[string]string{"SESSION_SECRET": " " + k1 + " , " + k2 + " ,"}[k] }, logger)
	require.NoError(t, err)
	require.Equal(t, []string{k1, k2}, cfg.sessionKeys)
	require.Equal(t, ":8080", cfg.addr)
	require.False(t, cfg.insecureCookie)
	cfg, err = loadConfig(func(string) string { return "" }, logger)
	require.NoError(t, err)
	require.Equal(t, []string{devSessionKey}, cfg.sessionKeys)
	_, err = loadConfig(func(k string) string { return map[string]string{"SESSION_SECRET": "short"}[k] }, logger)
	require.ErrorContains(t, err, "at least 32")
}

func TestBadRedisURL(t *testing.T) {
	err := run(context.Background(), func(k string) string { return map[string]string{"REDIS_URL": "http://nope", "ADDR": "127.0.0.1:0"}[k] },
		slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	require.ErrorContains(t, err, "REDIS_URL")
}

// client is a browser with a cookie jar against the example.
type client struct {
	t    *testing.T
	base string
	hc   *http.Client
}

func newClient(t *testing.T, base string) *client {
	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	return &client{t: t, base: base, hc: &http.Client{Jar: jar}}
}

func (c *client) call(method, path, body string) (int, map[string]any) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.base+path, strings.NewReader(body))
	require.NoError(c.t, err)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// TestGuideSessionRoutes walks the guide's session routes on the embedded
// Redis: login, profile, logout, and the new sessions, logout-all and
// preferences routes.
func TestGuideSessionRoutes(t *testing.T) {
	base := startExample(t, map[string]string{"COOKIE_INSECURE": "1"})
	require.Eventually(t, func() bool { code, _ := status(t, base+"/health"); return code == http.StatusOK }, 5*time.Second, 20*time.Millisecond)

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
}

// TestPreferencesFromTwoTabs: two tabs changing different preferences at
// the same time both keep their change.
func TestPreferencesFromTwoTabs(t *testing.T) {
	base := startExample(t, map[string]string{"COOKIE_INSECURE": "1"})
	require.Eventually(t, func() bool { code, _ := status(t, base+"/health"); return code == http.StatusOK }, 5*time.Second, 20*time.Millisecond)
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
}

// TestGuideCacheRoutes: the guide's cached routes, on the embedded Redis.
func TestGuideCacheRoutes(t *testing.T) {
	base := startExample(t, map[string]string{"COOKIE_INSECURE": "1"})
	require.Eventually(t, func() bool { code, _ := status(t, base+"/health"); return code == http.StatusOK }, 5*time.Second, 20*time.Millisecond)
	get := func(path string) (int, string, string) {
		resp, err := http.Get(base + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header.Get("X-Cache"), string(b)
	}
	put := func(path, body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPut, base+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
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
}
