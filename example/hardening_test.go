package main

// Regression tests for the example's part of the hardening issue: bodies
// and connections, HEAD probes, product writes, logins on another user's
// session, anonymous session creation, configuration mistakes and
// shutdown.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho"
	"github.com/redisecho/redisecho/internal/redistest"
)

// hostOf is base's host:port.
func hostOf(t *testing.T, base string) string {
	t.Helper()
	u, err := url.Parse(base)
	require.NoError(t, err)
	return u.Host
}

// readUntilClosed reads from conn until the server closes it, or within
// has passed (a generous bound: the timeouts under test are a second). It
// returns what the server sent, and an error when the connection was still
// open.
func readUntilClosed(conn net.Conn, within time.Duration) (string, error) {
	if err := conn.SetReadDeadline(time.Now().Add(within)); err != nil {
		return "", err
	}
	got, err := io.ReadAll(conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return string(got), fmt.Errorf("the server kept the connection open for %v; it sent %q", within, got)
	}
	return string(got), nil
}

// TestBodyLimits: every route bounds its body by its largest valid one: a
// longer Content-Length, or a chunked body that runs past the limit, gets
// 413 with a JSON error, and routes that take no body refuse any.
func TestBodyLimits(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		admin := loggedIn(t, base, "alice")
		tests := []struct {
			name         string
			method, path string
			limit        int
			chunked      bool
		}{
			{name: "login", method: http.MethodPost, path: "/login", limit: maxLoginBody},
			{name: "api login", method: http.MethodPost, path: "/api/auth/login", limit: maxLoginBody},
			{name: "preferences", method: http.MethodPut, path: "/preferences", limit: maxPreferencesBody},
			{name: "preferences, chunked", method: http.MethodPut, path: "/preferences", limit: maxPreferencesBody, chunked: true},
			{name: "product", method: http.MethodPut, path: "/api/products/7", limit: maxProductBody},
			{name: "product, chunked", method: http.MethodPut, path: "/api/products/7", limit: maxProductBody, chunked: true},
			{name: "logout takes no body", method: http.MethodPost, path: "/logout", limit: 0},
			{name: "a GET takes no body", method: http.MethodGet, path: "/api/products/7", limit: 0},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				// A JSON string as long as the limit allows, plus one byte.
				body := `{"name":"` + strings.Repeat("x", tt.limit) + `"}`
				var r io.Reader = strings.NewReader(body)
				if tt.chunked {
					r = io.MultiReader(r) // no length: sent chunked
				}
				req, err := http.NewRequest(tt.method, base+tt.path, r)
				require.NoError(t, err)
				req.Header.Set("Content-Type", "application/json")
				resp, err := admin.hc.Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				got, err := io.ReadAll(resp.Body)
				require.NoError(t, err)
				require.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode, "%s", got)
				require.JSONEq(t, fmt.Sprintf(`{"error":"Request body too large: this route takes at most %d bytes"}`, tt.limit), string(got))
			})
		}

		// Bodies written all in JSON escapes pass: 50 preferences with
		// 64-byte names, a 200-byte product name.
		var buf bytes.Buffer
		buf.WriteString("{")
		for i := range maxPreferences {
			if i > 0 {
				buf.WriteString(",")
			}
			fmt.Fprintf(&buf, `"%s":"%s"`, strings.Repeat(`\u0030`, 61)+fmt.Sprintf("%03d", i), strings.Repeat(`\u0001`, 200))
		}
		buf.WriteString("}")
		require.Greater(t, buf.Len(), 50<<10, "well beyond the unescaped size")
		code, body := admin.call(http.MethodPut, "/preferences", buf.String())
		require.Equal(t, http.StatusOK, code, "%v", body)
		require.Len(t, body, maxPreferences)
		code, body = admin.call(http.MethodPut, "/api/products/7", `{"name":"`+strings.Repeat(`\u0041`, maxProductName)+`"}`)
		require.Equal(t, http.StatusOK, code, "%v", body)
		require.Equal(t, strings.Repeat("A", maxProductName), body["name"])
	})
}

// TestServerTimeouts: a body sent a byte every 2 s is cut off by
// HTTP_READ_TIMEOUT, an idle keep-alive connection is closed after
// HTTP_IDLE_TIMEOUT, and a connection that sends nothing after
// HTTP_READ_HEADER_TIMEOUT.
func TestServerTimeouts(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{
			"REDIS_URL": redisURL, "COOKIE_INSECURE": "1",
			"HTTP_READ_HEADER_TIMEOUT": "1s", "HTTP_READ_TIMEOUT": "1s", "HTTP_IDLE_TIMEOUT": "1s",
		})
		host := hostOf(t, base)

		t.Run("slow body", func(t *testing.T) {
			conn, err := net.Dial("tcp", host)
			require.NoError(t, err)
			defer conn.Close()
			const length = 100
			_, err = fmt.Fprintf(conn, "PUT /preferences HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{", host, length)
			require.NoError(t, err)
			type result struct {
				got string
				err error
			}
			closed := make(chan result, 1)
			go func() {
				got, err := readUntilClosed(conn, 20*time.Second)
				closed <- result{got, err}
			}()
			sent := 1
			tick := time.NewTicker(2 * time.Second)
			defer tick.Stop()
			for {
				select {
				case r := <-closed:
					require.NoError(t, r.err)
					got := r.got
					require.Less(t, sent, length, "cut off before the body was complete")
					if got != "" {
						require.True(t, strings.HasPrefix(got, "HTTP/1.1 400 "), "%q", got)
					}
					return
				case <-tick.C:
					if _, err := conn.Write([]byte(" ")); err == nil {
						sent++
					}
				}
			}
		})

		t.Run("idle keep-alive connection", func(t *testing.T) {
			conn, err := net.Dial("tcp", host)
			require.NoError(t, err)
			defer conn.Close()
			_, err = fmt.Fprintf(conn, "GET /livez HTTP/1.1\r\nHost: %s\r\n\r\n", host)
			require.NoError(t, err)
			r := bufio.NewReader(conn)
			resp, err := http.ReadResponse(r, nil)
			require.NoError(t, err)
			_, _ = io.Copy(io.Discard, resp.Body)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.False(t, resp.Close, "kept alive")
			require.NoError(t, conn.SetReadDeadline(time.Now().Add(20*time.Second)))
			_, err = r.ReadByte()
			require.ErrorIs(t, err, io.EOF, "closed by the server once idle")
		})

		t.Run("connection that sends nothing", func(t *testing.T) {
			conn, err := net.Dial("tcp", host)
			require.NoError(t, err)
			defer conn.Close()
			got, err := readUntilClosed(conn, 20*time.Second)
			require.NoError(t, err)
			require.Empty(t, got)
		})
	})
}

// TestTimeoutConfig: the server's timeouts come from the environment,
// as positive Go durations.
func TestTimeoutConfig(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg, err := loadConfig(envOf(nil), logger)
	require.NoError(t, err)
	require.Equal(t, defaultTimeouts, cfg.timeouts)
	cfg, err = loadConfig(envOf(map[string]string{
		"HTTP_READ_HEADER_TIMEOUT": "2s", "HTTP_READ_TIMEOUT": "3s", "HTTP_WRITE_TIMEOUT": "4s", "HTTP_IDLE_TIMEOUT": " 5s ", "SHUTDOWN_TIMEOUT": "250ms",
	}), logger)
	require.NoError(t, err)
	require.Equal(t, timeouts{readHeader: 2 * time.Second, read: 3 * time.Second, write: 4 * time.Second, idle: 5 * time.Second, shutdown: 250 * time.Millisecond}, cfg.timeouts)
	for _, env := range []string{"HTTP_READ_HEADER_TIMEOUT", "HTTP_READ_TIMEOUT", "HTTP_WRITE_TIMEOUT", "HTTP_IDLE_TIMEOUT", "SHUTDOWN_TIMEOUT"} {
		for _, v := range []string{"", "0", "-1s", "10", "soon"} {
			_, err := loadConfig(envOf(map[string]string{env: v}), logger)
			require.ErrorContains(t, err, env+": want a positive Go duration", "%s=%q", env, v)
		}
	}
}

// TestHeadProbes: load balancers probe /health and /livez with HEAD: the
// full app answers them as it answers GET, and so does the app that serves
// while Redis is unreachable.
func TestHeadProbes(t *testing.T) {
	head := func(t *testing.T, url string) int {
		t.Helper()
		resp, err := http.Head(url)
		require.NoError(t, err)
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	forEachFaultTopology(t, func(t *testing.T, tp *redistest.Topology) {
		tp.StopServers()
		base := startExample(t, map[string]string{"REDIS_URL": tp.URL(), "COOKIE_INSECURE": "1"})
		require.Equal(t, http.StatusOK, head(t, base+"/livez"), "boot app")
		require.Equal(t, http.StatusServiceUnavailable, head(t, base+"/health"), "boot app, Redis unreachable")

		require.NoError(t, tp.StartServers())
		waitServing(t, base, 20*time.Second)
		require.Equal(t, http.StatusOK, head(t, base+"/livez"), "full app")
		require.Equal(t, http.StatusOK, head(t, base+"/health"), "full app")
	})
}

// TestProductWritesNeedAdmin: PUT /api/products/:id is alice's: 401
// without a login and 403 for other users, whatever the ID and the body.
func TestProductWritesNeedAdmin(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		anon, bob, alice := newClient(t, base), loggedIn(t, base, "bob"), loggedIn(t, base, "alice")
		tests := []struct {
			name       string
			path, body string
			alice      int
		}{
			{name: "valid", path: "/api/products/7", body: `{"price": 2.5}`, alice: http.StatusOK},
			{name: "invalid body", path: "/api/products/7", body: `{"price": "free"}`, alice: http.StatusBadRequest},
			{name: "unknown field", path: "/api/products/7", body: `{"stock": 3}`, alice: http.StatusBadRequest},
			{name: "no such product", path: "/api/products/99", body: `{"price": 1}`, alice: http.StatusNotFound},
			{name: "junk ID", path: "/api/products/x%7B", body: `{"price": 1}`, alice: http.StatusNotFound},
			{name: "non-canonical ID", path: "/api/products/07", body: `{"price": 1}`, alice: http.StatusNotFound},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				code, body := anon.call(http.MethodPut, tt.path, tt.body)
				require.Equal(t, http.StatusUnauthorized, code)
				require.Equal(t, "Not authenticated", body["error"])
				code, body = bob.call(http.MethodPut, tt.path, tt.body)
				require.Equal(t, http.StatusForbidden, code)
				require.Equal(t, "Only an admin may change products", body["error"])
				code, _ = alice.call(http.MethodPut, tt.path, tt.body)
				require.Equal(t, tt.alice, code)
			})
		}
		code, body := anon.call(http.MethodGet, "/api/products/7", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, 2.5, body["price"], "only alice's update landed")
	})
}

// TestCanonicalProductIDs: an ID is parsed before it reaches a cache key
// or a tag. Other spellings of an ID redirect to the canonical URL, so one
// update never leaves a stale copy under "/07"; anything that is no ID is
// a 404 that nothing caches.
func TestCanonicalProductIDs(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		t.Cleanup(noFollow.CloseIdleConnections)
		tests := []struct {
			given    string
			code     int
			location string
		}{
			{given: "/api/products/7", code: http.StatusOK},
			{given: "/api/products/07", code: http.StatusMovedPermanently, location: "/api/products/7"},
			{given: "/api/products/+7", code: http.StatusMovedPermanently, location: "/api/products/7"},
			{given: "/api/products/0007?fields=price", code: http.StatusMovedPermanently, location: "/api/products/7?fields=price"},
			{given: "/api/users/01", code: http.StatusMovedPermanently, location: "/api/users/1"},
			{given: "/api/products/0", code: http.StatusNotFound},
			{given: "/api/products/-7", code: http.StatusNotFound},
			{given: "/api/products/7.0", code: http.StatusNotFound},
			{given: "/api/products/1e1", code: http.StatusNotFound},
			{given: "/api/products/%207", code: http.StatusNotFound},
			{given: "/api/products/9999999999", code: http.StatusNotFound},
			{given: "/api/products/" + strings.Repeat("7", 5000), code: http.StatusNotFound},
			{given: "/api/users/bob", code: http.StatusNotFound},
		}
		for _, tt := range tests {
			t.Run(tt.given[:min(len(tt.given), 40)], func(t *testing.T) {
				for range 2 {
					resp, err := noFollow.Get(base + tt.given)
					require.NoError(t, err)
					_ = resp.Body.Close()
					require.Equal(t, tt.code, resp.StatusCode)
					require.Equal(t, tt.location, resp.Header.Get("Location"))
					if tt.code != http.StatusOK {
						require.Empty(t, resp.Header.Get("X-Cache"), "answered before the cache")
					}
				}
			})
		}

		// GET /09 (cached under 9), PUT 9, and every spelling is fresh.
		browser := newClient(t, base)
		for _, want := range []string{"MISS", "HIT"} {
			code, h, body := browser.request(http.MethodGet, "/api/products/09", "")
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, want, h.Get("X-Cache"))
			require.Equal(t, float64(9), body["id"])
		}
		code, _ := loggedIn(t, base, "alice").call(http.MethodPut, "/api/products/9", `{"price": 0.07}`)
		require.Equal(t, http.StatusOK, code)
		for _, path := range []string{"/api/products/09", "/api/products/+9", "/api/products/9"} {
			code, _, body := browser.request(http.MethodGet, path, "")
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, 0.07, body["price"], path)
		}
	})
}

// TestCatalogueSharedByInstances: the catalogue lives in Redis, so two
// instances (each with its own client) agree: an update on one is served
// by the other, whose cached copies the update invalidated. A restart
// seeds nothing over it.
func TestCatalogueSharedByInstances(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		env := func() map[string]string {
			return map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "SESSION_SECRET": strings.Repeat("s", 32)}
		}
		a, b := startReady(t, env()), startReady(t, env())
		onA, onB := newClient(t, a), newClient(t, b)
		price := func(c *client, path string) (any, string) {
			t.Helper()
			code, h, body := c.request(http.MethodGet, path, "")
			require.Equal(t, http.StatusOK, code)
			if path == "/api/products" {
				return body, h.Get("X-Cache") // not an object: decoded as nil
			}
			return body["price"], h.Get("X-Cache")
		}
		three := 3
		p, xc := price(onA, "/api/products/3")
		require.Equal(t, float64(three)*9.99, p, "the seeded price")
		require.Equal(t, "MISS", xc)
		_, xc = price(onB, "/api/products/3")
		require.Equal(t, "HIT", xc, "the response cache is shared too")
		_, xc = price(onA, "/api/products/3")
		require.Equal(t, "HIT", xc)
		_, xc = price(onA, "/api/products")
		require.Equal(t, "MISS", xc)

		code, body := loggedIn(t, b, "alice").call(http.MethodPut, "/api/products/3", `{"price": 3.5, "name": "Three"}`)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"id": float64(3), "name": "Three", "price": 3.5}, body)

		p, xc = price(onA, "/api/products/3")
		require.Equal(t, 3.5, p, "instance A serves B's update")
		require.Equal(t, "MISS", xc, "A's cached copy was invalidated")
		code, raw := onA.raw(http.MethodGet, "/api/products", "")
		require.Equal(t, http.StatusOK, code)
		require.Contains(t, raw, `{"id":3,"name":"Three","price":3.5}`)

		c := startReady(t, env())
		p, _ = price(newClient(t, c), "/api/products/3")
		require.Equal(t, 3.5, p, "a third instance seeds nothing over the update")
	})
}

// TestLoginOnAnotherUsersSession: bob logging in on alice's browser starts
// from an empty session: none of alice's values carry over. A visitor's
// anonymous preferences, and a user's own on a new login, do.
func TestLoginOnAnotherUsersSession(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		browser := newClient(t, base)
		code, _ := browser.call(http.MethodPut, "/preferences", `{"theme":"dark"}`)
		require.Equal(t, http.StatusOK, code)
		code, _ = browser.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code)
		code, body := browser.call(http.MethodPut, "/preferences", `{"diary":"alice's secret"}`)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"theme": "dark", "diary": "alice's secret"}, body, "the anonymous preference was kept at login")

		code, _ = browser.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code)
		code, body = browser.call(http.MethodGet, "/preferences", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"theme": "dark", "diary": "alice's secret"}, body, "alice again: her own session")

		code, _ = browser.call(http.MethodPost, "/api/auth/login", `{"username":"bob","password":"builder"}`)
		require.Equal(t, http.StatusOK, code)
		code, body = browser.call(http.MethodGet, "/preferences", "")
		require.Equal(t, http.StatusOK, code)
		require.Empty(t, body, "bob gets none of alice's values")
		code, body = browser.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"userId": float64(2), "username": "bob"}, body)
		code, body = browser.call(http.MethodGet, "/sessions", "")
		require.Equal(t, http.StatusOK, code)
		require.Len(t, body["sessions"], 1, "bob's one session")

		code, body = loggedIn(t, base, "alice").call(http.MethodGet, "/sessions", "")
		require.Equal(t, http.StatusOK, code)
		require.Len(t, body["sessions"], 1, "alice's index lost the session bob took over")
	})
}

// TestAnonymousSessionCreationLimit: one client address may create
// newSessionsPerClient sessions without logging in per window; requests
// that carry a live session are never counted, nor are refused ones.
func TestAnonymousSessionCreationLimit(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "TRUSTED_PROXIES": "127.0.0.1"})
		ips := newClientIPs()
		here := ips.ip()
		visitor := func() *client {
			c := newClient(t, base)
			c.forwardedFor = here
			return c
		}
		for i := range 5 {
			code, _ := visitor().call(http.MethodPut, "/preferences", `{"theme": 1}`)
			require.Equal(t, http.StatusBadRequest, code, "bad body %d: refused, creates nothing, not counted", i+1)
			code, h, body := visitor().request(http.MethodPut, "/preferences", `{}`)
			require.Equal(t, http.StatusOK, code)
			require.Empty(t, body)
			require.Empty(t, h.Values("Set-Cookie"), "empty object %d: nothing to store, no session, not counted", i+1)
		}
		var first *client
		for i := range newSessionsPerClient {
			c := visitor()
			code, h, _ := c.request(http.MethodPut, "/preferences", `{"theme":"dark"}`)
			require.Equal(t, http.StatusOK, code, "new session %d", i+1)
			require.Equal(t, strconv.Itoa(newSessionsPerClient-1-i), h.Get("X-RateLimit-Remaining"), "new session %d", i+1)
			if first == nil {
				first = c
			}
		}
		code, h, body := visitor().request(http.MethodPut, "/preferences", `{"theme":"dark"}`)
		require.Equal(t, http.StatusTooManyRequests, code, "one session more than the limit")
		require.Equal(t, map[string]any{"error": "Too many new sessions from this address, please try again later."}, body)
		retry, err := strconv.Atoi(h.Get("Retry-After"))
		require.NoError(t, err)
		require.True(t, retry > 0 && retry <= int(newSessionWindow/time.Second), "Retry-After %d", retry)
		require.Empty(t, h.Values("Set-Cookie"), "no session")

		// The first visitor, from the same address, with many tabs.
		var wg sync.WaitGroup
		for i := range 2 * newSessionsPerClient {
			wg.Go(func() {
				code, h, _ := first.request(http.MethodPut, "/preferences", fmt.Sprintf(`{"tab%d":"on"}`, i))
				if code != http.StatusOK || h.Get("X-RateLimit-Remaining") != "" {
					t.Errorf("tab %d: %d, RateLimit %q: a visitor with a session is not counted", i, code, h.Get("X-RateLimit-Remaining"))
				}
			})
		}
		wg.Wait()
		code, _ = visitor().call(http.MethodGet, "/preferences", "")
		require.Equal(t, http.StatusOK, code, "reading creates no session")
		code, _ = loggedIn(t, base, "bob").call(http.MethodPut, "/preferences", `{"theme":"light"}`)
		require.Equal(t, http.StatusOK, code, "a logged-in user's session exists")

		elsewhere := newClient(t, base)
		elsewhere.forwardedFor = ips.ip()
		code, _ = elsewhere.call(http.MethodPut, "/preferences", `{"theme":"dark"}`)
		require.Equal(t, http.StatusOK, code, "another address has its own count")
	})
}

// TestPreferenceNull: null deletes a preference (as in a JSON merge
// patch); any value but a string or null is a 400.
func TestPreferenceNull(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		c := newClient(t, base)
		code, body := c.call(http.MethodPut, "/preferences", `{"theme":"dark","lang":"fr"}`)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"theme": "dark", "lang": "fr"}, body)
		code, body = c.call(http.MethodPut, "/preferences", `{"theme":null,"never-set":null}`)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"lang": "fr"}, body)
		for _, bad := range []string{`{"lang":1}`, `{"lang":true}`, `{"lang":{}}`, `{"lang":["fr"]}`, `null`, `{"lang":"fr"} {}`} {
			code, body = c.call(http.MethodPut, "/preferences", bad)
			require.Equal(t, http.StatusBadRequest, code, bad)
			require.Equal(t, "Body must be a JSON object of strings (null deletes a preference)", body["error"])
		}
		code, body = c.call(http.MethodGet, "/preferences", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, map[string]any{"lang": "fr"}, body, "bad requests changed nothing")
	})
}

// TestSessionSecretConfig: SESSION_SECRET unset uses the development key
// with a warning that says so; set but holding no key refuses to start.
func TestSessionSecretConfig(t *testing.T) {
	tests := []struct {
		name    string
		given   map[string]string
		wantErr string
		wantLog string
	}{
		{name: "unset", given: nil, wantLog: "SESSION_SECRET is unset"},
		{name: "empty", given: map[string]string{"SESSION_SECRET": ""}, wantErr: "SESSION_SECRET is set but holds no key (0 bytes"},
		{name: "commas and spaces", given: map[string]string{"SESSION_SECRET": " , ,"}, wantErr: "SESSION_SECRET is set but holds no key (4 bytes"},
		{name: "short key", given: map[string]string{"SESSION_SECRET": "short"}, wantErr: "key 1 is 5 bytes; each key needs at least 32"},
		{name: "key ring", given: map[string]string{"SESSION_SECRET": strings.Repeat("k", 32) + ","}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var log bytes.Buffer
			cfg, err := loadConfig(envOf(tt.given), slog.New(slog.NewTextHandler(&log, nil)))
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				require.NotContains(t, log.String(), "development key", "no fallback")
				tt.given["ADDR"] = "127.0.0.1:0"
				require.ErrorContains(t, run(t.Context(), envOf(tt.given), slog.New(slog.NewTextHandler(io.Discard, nil)), nil), tt.wantErr, "the app refuses to start")
				return
			}
			require.NoError(t, err)
			if tt.wantLog != "" {
				require.Equal(t, []string{devSessionKey}, cfg.sessionKeys)
				require.Contains(t, log.String(), tt.wantLog)
			} else {
				require.Empty(t, log.String())
			}
		})
	}
}

// health is GET /health's status and JSON body.
func health(t *testing.T, base string) (int, string, map[string]any) {
	t.Helper()
	resp, err := http.Get(base + "/health")
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var body map[string]any
	require.NoError(t, json.Unmarshal(raw, &body), "%s", raw)
	return resp.StatusCode, string(raw), body
}

// requireDialFailure starts the app on redisURL and checks that it logs
// why it cannot connect, as code, and that /health reports the code and
// nothing more.
func requireDialFailure(t *testing.T, redisURL, code string, within time.Duration) {
	t.Helper()
	var log redistest.SyncBuffer
	base := startExampleLogging(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "SESSION_SECRET": strings.Repeat("d", 32)}, &log)
	require.Eventually(t, func() bool {
		return strings.Contains(log.String(), "reason="+code)
	}, within, 50*time.Millisecond, "the log says why: %s", &log)
	require.Contains(t, log.String(), `msg="cannot connect to Redis yet; retrying"`)
	status, raw, body := health(t, base)
	require.Equal(t, http.StatusServiceUnavailable, status)
	require.Equal(t, map[string]any{"status": "unavailable", "redis": map[string]any{"state": "connecting", "error": code, "latency_ms": float64(0), "breaker": ""}}, body,
		"a fixed code, never internal text: %s", raw)
}

// TestDialFailuresSaySo: while the app cannot connect, its log gives the
// reason and /health a fixed code: a wrong or missing password is "auth"
// (on both topologies), a port that is not Redis "protocol", a closed port
// "refused", a peer that never answers "timeout".
func TestDialFailuresSaySo(t *testing.T) {
	t.Run("auth", func(t *testing.T) {
		forEachFaultTopology(t, func(t *testing.T, tp *redistest.Topology) {
			for _, addr := range tp.Addrs {
				_, err := redistest.Do(addr, 2*time.Second, "CONFIG", "SET", "requirepass", "right")
				require.NoError(t, err)
			}
			t.Run("no password", func(t *testing.T) { requireDialFailure(t, tp.URL(), "auth", 10*time.Second) })
			wrong := strings.Replace(tp.URL(), "redis://", "redis://:wrong@", 1)
			t.Run("wrong password", func(t *testing.T) { requireDialFailure(t, wrong, "auth", 10*time.Second) })
		})
	})
	t.Run("protocol", func(t *testing.T) {
		notRedis := httptest.NewServer(http.NotFoundHandler())
		defer notRedis.Close()
		requireDialFailure(t, "redis://"+notRedis.Listener.Addr().String(), "protocol", 10*time.Second)
	})
	t.Run("refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := ln.Addr().String()
		require.NoError(t, ln.Close())
		requireDialFailure(t, "redis://"+addr, "refused", 10*time.Second)
	})
	t.Run("timeout", func(t *testing.T) {
		// A peer that accepts and never says a word.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		var mu sync.Mutex
		var conns []net.Conn
		defer func() {
			mu.Lock()
			defer mu.Unlock()
			for _, c := range conns {
				_ = c.Close()
			}
		}()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
		requireDialFailure(t, "redis://"+ln.Addr().String(), "timeout", 30*time.Second)
	})
}

// buildExample builds the example's binary once for the tests that run it
// as a process.
var buildExample = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "redisecho-example-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "example")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

// TestSIGTERMDrains runs the example as a process: SIGTERM during a
// request lets the request finish, then the process exits 0 within
// SHUTDOWN_TIMEOUT.
func TestSIGTERMDrains(t *testing.T) {
	bin, err := buildExample()
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(filepath.Dir(bin)) })
	forEachTopology(t, func(t *testing.T, redisURL string) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := ln.Addr().String()
		require.NoError(t, ln.Close())
		var log redistest.SyncBuffer
		cmd := exec.Command(bin)
		cmd.Env = append(os.Environ(), "REDIS_URL="+redisURL, "ADDR="+addr, "COOKIE_INSECURE=1",
			"SESSION_SECRET="+strings.Repeat("t", 32), "SHUTDOWN_TIMEOUT=10s")
		cmd.Stdout, cmd.Stderr = &log, &log
		require.NoError(t, cmd.Start())
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() {
			if cmd.Process.Kill() == nil { // still running: the test failed
				<-exited
			}
		})
		base := "http://" + addr
		require.Eventually(t, func() bool {
			resp, err := http.Get(base + "/health")
			if err != nil {
				return false
			}
			_ = resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		}, 20*time.Second, 50*time.Millisecond, "the process serves: %s", &log)

		// A request in flight: its handler runs (it asked for the body
		// with 100 Continue) when SIGTERM comes, and its body follows.
		conn, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer conn.Close()
		body := `{"theme":"dark"}`
		_, err = fmt.Fprintf(conn, "PUT /preferences HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n", addr, len(body))
		require.NoError(t, err)
		r := bufio.NewReader(conn)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(10*time.Second)))
		line, err := r.ReadString('\n')
		require.NoError(t, err)
		require.Equal(t, "HTTP/1.1 100 Continue\r\n", line)
		_, err = r.ReadString('\n')
		require.NoError(t, err)

		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		require.Eventually(t, func() bool { return strings.Contains(log.String(), "shutting down") }, 10*time.Second, 10*time.Millisecond, "%s", &log)
		select {
		case err := <-exited:
			t.Fatalf("exited with a request in flight: %v\n%s", err, &log)
		default:
		}
		_, err = conn.Write([]byte(body))
		require.NoError(t, err)
		resp, err := http.ReadResponse(r, nil)
		require.NoError(t, err)
		got, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", got)
		require.JSONEq(t, body, string(got), "the request finished")

		select {
		case err := <-exited:
			require.NoError(t, err, "exit code 0\n%s", &log)
		case <-time.After(10*time.Second + 5*time.Second):
			t.Fatalf("still running after SHUTDOWN_TIMEOUT and 5 s\n%s", &log)
		}
		require.Contains(t, log.String(), `msg=stopped`)
	})
}

// TestLogoutEverywhereWithoutIndex: when the per-user index is gone
// (evicted, deleted), "log out everywhere" cannot find the other sessions;
// the app says so instead of claiming success, and still ends this one.
func TestLogoutEverywhereWithoutIndex(t *testing.T) {
	for _, tp := range []*redistest.Topology{standaloneRedis, clusterRedis} {
		t.Run(tp.Name, func(t *testing.T) {
			clearExampleKeys(t, tp)
			t.Cleanup(func() { clearExampleKeys(t, tp) })
			base := startReady(t, map[string]string{"REDIS_URL": tp.URL(), "COOKIE_INSECURE": "1"})
			laptop, phone := loggedIn(t, base, "alice"), loggedIn(t, base, "alice")

			n, err := tp.DeleteKeys(redisecho.DefaultPrefix + "{user:1}:sessions")
			require.NoError(t, err)
			require.Equal(t, 1, n, "alice's index")

			code, body := phone.call(http.MethodPost, "/logout-all", "")
			require.Equal(t, http.StatusInternalServerError, code)
			require.Contains(t, body["error"], "other sessions may still be signed in")
			code, _ = phone.call(http.MethodGet, "/profile", "")
			require.Equal(t, http.StatusUnauthorized, code, "this session ended all the same")
			code, _ = laptop.call(http.MethodGet, "/profile", "")
			require.Equal(t, http.StatusOK, code, "the one the lost index hid lives on, as reported")
		})
	}
}
