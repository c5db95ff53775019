package main

// Regression tests from the review of the hardening issue's example part.

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho/internal/redistest"
)

// TestPreferencesTooLargeChangeNothing: a PUT /preferences refused with 413
// because the session would grow too large changes nothing: no value of the
// request is kept, and a visitor without a session gets none, so the
// request is rightly not counted as a session creation (else a client
// could create sessions without limit, each answered 413).
func TestPreferencesTooLargeChangeNothing(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "TRUSTED_PROXIES": "127.0.0.1"})
		// Eight values of 1000 bytes: more than an anonymous session
		// holds (AnonymousMaxSize, 4 KiB), though each fits alone.
		var parts []string
		for i := range 8 {
			parts = append(parts, fmt.Sprintf(`"p%d":"%s"`, i, strings.Repeat("x", 1000-1)+"y"))
		}
		big := "{" + strings.Join(parts, ",") + "}"

		t.Run("new visitors", func(t *testing.T) {
			ip := newClientIPs().ip()
			for i := range newSessionsPerClient + 5 {
				c := newClient(t, base)
				c.forwardedFor = ip
				code, h, body := c.request(http.MethodPut, "/preferences", big)
				require.Equal(t, http.StatusRequestEntityTooLarge, code, "attempt %d: %v", i+1, body)
				require.Empty(t, h.Values("Set-Cookie"), "attempt %d: a refused request creates no session", i+1)
			}
		})
		t.Run("deleting what is not there", func(t *testing.T) {
			code, h, body := newClient(t, base).request(http.MethodPut, "/preferences", `{"theme":null}`)
			require.Equal(t, http.StatusOK, code)
			require.Empty(t, body)
			require.Empty(t, h.Values("Set-Cookie"), "no empty session for a visitor who had none")
		})
		t.Run("a visitor with a session", func(t *testing.T) {
			c := newClient(t, base)
			code, _ := c.call(http.MethodPut, "/preferences", `{"theme":"dark","p3":"kept"}`)
			require.Equal(t, http.StatusOK, code)
			code, _ = c.call(http.MethodPut, "/preferences", big)
			require.Equal(t, http.StatusRequestEntityTooLarge, code)
			code, body := c.call(http.MethodGet, "/preferences", "")
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, map[string]any{"theme": "dark", "p3": "kept"}, body, "the refused request changed nothing")
		})
	})
}

// setMaxmemory sets maxmemory on every server of tp ("1": full at once,
// "0": no limit), with the default noeviction policy.
func setMaxmemory(t *testing.T, tp *redistest.Topology, v string) {
	t.Helper()
	for _, s := range tp.Servers {
		_, err := redistest.Do(s.Addr(), 5*time.Second, "CONFIG", "SET", "maxmemory", v)
		require.NoError(t, err)
	}
}

// TestStartsInAFullRedis: an instance that starts (a deploy, a restart)
// while Redis is full and refuses writes serves the full app once the
// catalogue is there, since reads still work: seeding a catalogue that is
// complete writes nothing. Product writes then fail cleanly with 503.
func TestStartsInAFullRedis(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, tp *redistest.Topology) {
		env := func() map[string]string {
			return map[string]string{"REDIS_URL": tp.URL(), "COOKIE_INSECURE": "1", "SESSION_SECRET": strings.Repeat("s", 32)}
		}
		first := startReady(t, env()) // seeds the catalogue
		alice := loggedIn(t, first, "alice")
		setMaxmemory(t, tp, "1")
		t.Cleanup(func() { setMaxmemory(t, tp, "0") })

		base := startExample(t, env())
		waitServing(t, base, 10*time.Second)
		code, body := newClient(t, base).call(http.MethodGet, "/api/products/3", "")
		require.Equal(t, http.StatusOK, code, "%v", body)
		require.Equal(t, "Product 3", body["name"])

		code, body = alice.call(http.MethodPut, "/api/products/3", `{"price": 1}`)
		require.Equal(t, http.StatusServiceUnavailable, code, "%v", body)
		setMaxmemory(t, tp, "0")
		code, body = newClient(t, base).call(http.MethodGet, "/api/products/3", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, 3*9.99, body["price"], "the refused write wrote nothing")
	})
}

// TestAPIReadsAnswerHEAD: the API's reads answer HEAD with GET's status and
// headers (the cache serves it), and another spelling of an ID redirects on
// HEAD as on GET.
func TestAPIReadsAnswerHEAD(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1"})
		noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		t.Cleanup(noFollow.CloseIdleConnections)
		head := func(path string) *http.Response {
			t.Helper()
			resp, err := noFollow.Head(base + path)
			require.NoError(t, err)
			_ = resp.Body.Close()
			return resp
		}
		tests := []struct {
			path, location string
			code           int
			caches         bool
		}{
			{path: "/api/products", code: http.StatusOK, caches: true},
			{path: "/api/products/7", code: http.StatusOK, caches: true},
			{path: "/api/users/1", code: http.StatusOK, caches: true},
			{path: "/api/products/07", code: http.StatusMovedPermanently, location: "/api/products/7"},
			{path: "/api/users/+2", code: http.StatusMovedPermanently, location: "/api/users/2"},
			{path: "/api/products/x", code: http.StatusNotFound},
		}
		for _, tt := range tests {
			t.Run(tt.path, func(t *testing.T) {
				first, second := head(tt.path), head(tt.path)
				require.Equal(t, tt.code, first.StatusCode)
				require.Equal(t, tt.location, first.Header.Get("Location"))
				if tt.caches {
					require.Equal(t, "application/json", first.Header.Get("Content-Type"))
					require.Equal(t, []string{"MISS", "HIT"}, []string{first.Header.Get("X-Cache"), second.Header.Get("X-Cache")})
				}
			})
		}
		code, body := newClient(t, base).call(http.MethodGet, "/api/users/1", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "alice", body["username"], "a GET after a HEAD under the same custom key has its body")
	})
}

// TestProductUpdateThatLandsLate: a product update that timed out while
// Redis was paused may still run when Redis resumes (the client keeps a
// timed-out command queued). Its 503 must not leave the cache serving the
// old price once the new one is in the catalogue.
func TestProductUpdateThatLandsLate(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, tp *redistest.Topology) {
		base := startReady(t, map[string]string{"REDIS_URL": tp.URL(), "COOKIE_INSECURE": "1"})
		alice, browser := loggedIn(t, base, "alice"), newClient(t, base)
		for _, want := range []string{"MISS", "HIT"} {
			code, h, _ := browser.request(http.MethodGet, "/api/products/4", "")
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, want, h.Get("X-Cache"))
		}
		code, _ := alice.call(http.MethodPut, "/api/products/5", `{"price": 5.5}`)
		require.Equal(t, http.StatusOK, code, "the update script is loaded")
		code, _ = alice.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code)

		for _, s := range tp.Servers {
			require.NoError(t, s.Pause())
		}
		code, body := alice.call(http.MethodPut, "/api/products/4", `{"price": 4.5}`)
		for _, s := range tp.Servers {
			require.NoError(t, s.Resume())
		}
		t.Logf("PUT while paused: %d %v", code, body)
		require.NotEqual(t, http.StatusOK, code)

		require.Eventually(t, func() bool {
			code, _ := status(t, base+"/health")
			return code == http.StatusOK
		}, 20*time.Second, 50*time.Millisecond)
		time.Sleep(500 * time.Millisecond) // the late script has run by now
		code, h, body := browser.request(http.MethodGet, "/api/products/4", "")
		require.Equal(t, http.StatusOK, code)
		t.Logf("after resume: X-Cache %s, price %v", h.Get("X-Cache"), body["price"])
		code, _, fresh := newClient(t, base).request(http.MethodGet, "/api/products/4?fresh=1", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, fresh["price"], body["price"], "the cached page matches the catalogue (%v)", fresh["price"])
	})
}

// TestUpdateScriptRefusesWhenLate: the update script writes nothing when
// it runs after its caller's deadline (in the node's clock), and applies
// the update before it.
func TestUpdateScriptRefusesWhenLate(t *testing.T) {
	for _, tp := range []*redistest.Topology{standaloneRedis, clusterRedis} {
		t.Run(tp.Name, func(t *testing.T) {
			clearExampleKeys(t, tp)
			t.Cleanup(func() { clearExampleKeys(t, tp) })
			client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: tp.Addrs})
			require.NoError(t, err)
			t.Cleanup(client.Close)
			db := newCatalogue(client)
			ctx := context.Background()
			require.NoError(t, db.seed(ctx))
			now, err := clockScript.Exec(ctx, client, []string{db.key}, nil).AsInt64()
			require.NoError(t, err)

			late := []string{strconv.FormatInt(now-1, 10), nameField(6), priceField(6), priceField(6), "0.5"}
			err = updateScript.Exec(ctx, client, []string{db.key}, late).Error()
			require.ErrorContains(t, err, "LATE")
			p, err := db.get(ctx, 6)
			require.NoError(t, err)
			require.Equal(t, 6*9.99, p.Price, "a late update writes nothing")

			price := 0.5
			p, err = db.update(ctx, 6, nil, &price)
			require.NoError(t, err, "in time")
			require.Equal(t, product{ID: 6, Name: "Product 6", Price: 0.5}, p)
		})
	}
}

// TestEmbeddedRedisProductUpdate: the catalogue's scripts (TIME included)
// run on the embedded miniredis too.
func TestEmbeddedRedisProductUpdate(t *testing.T) {
	base := startExample(t, map[string]string{"COOKIE_INSECURE": "1"})
	waitServing(t, base, 5*time.Second)
	code, body := loggedIn(t, base, "alice").call(http.MethodPut, "/api/products/3", `{"price": 3.25}`)
	require.Equal(t, http.StatusOK, code, "%v", body)
	code, body = newClient(t, base).call(http.MethodGet, "/api/products/3", "")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, 3.25, body["price"])
}

// TestLoginSessionCreationLimit: a login without a session creates one,
// which holds Redis memory for its idle timeout, and successful logins are
// not charged by the login limiter: so logins from one address that create
// sessions count against the same per-address creation limit as anonymous
// ones, whoever signs in (the demo's passwords are public). A login on a
// live session (it is regenerated, not added) and a failed one are not
// counted.
func TestLoginSessionCreationLimit(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, map[string]string{"REDIS_URL": redisURL, "COOKIE_INSECURE": "1", "TRUSTED_PROXIES": "127.0.0.1"})
		ip := newClientIPs().ip()
		from := func() *client {
			c := newClient(t, base)
			c.forwardedFor = ip
			return c
		}
		for _, path := range []string{"/login", "/api/auth/login"} {
			code, _ := from().call(http.MethodPost, path, `{"username":"alice","password":"nope"}`)
			require.Equal(t, http.StatusUnauthorized, code)
		}
		var last *client
		for i := range newSessionsPerClient {
			last = from()
			path := []string{"/login", "/api/auth/login"}[i%2]
			code, body := last.call(http.MethodPost, path, `{"username":"bob","password":"builder"}`)
			require.Equal(t, http.StatusOK, code, "login %d: %v", i+1, body)
		}
		for _, path := range []string{"/login", "/api/auth/login"} {
			code, h, body := from().request(http.MethodPost, path, `{"username":"bob","password":"builder"}`)
			require.Equal(t, http.StatusTooManyRequests, code, "%s: one new session more than the limit: %v", path, body)
			require.Equal(t, map[string]any{"error": "Too many new sessions from this address, please try again later."}, body)
			require.NotEmpty(t, h.Get("Retry-After"))
			require.Empty(t, h.Values("Set-Cookie"), "no session")
		}
		code, body := last.call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
		require.Equal(t, http.StatusOK, code, "a login on a live session creates none: %v", body)
		code, body = last.call(http.MethodGet, "/profile", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "alice", body["username"])
	})
}
