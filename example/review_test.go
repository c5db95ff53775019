package main

// Regression tests from the review of the hardening issue's example part.

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
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
