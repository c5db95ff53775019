package main

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho"
	"github.com/redisecho/redisecho/internal/expresstest"
)

// TestExpressSideBySide: the README's migration setup. The guide's
// Express app (express-session + connect-redis, the real packages) and
// the example with EXPRESS_SESSION_SECRET share one Redis and one browser:
// a login on either side is a login on both, values set by Go read in
// Express, a logout on either side ends the session on both, and the
// routes the mode cannot serve say so.
func TestExpressSideBySide(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		prefix := redisecho.DefaultPrefix + "express-session:" // cleared with the example's keys
		env := map[string]string{"SESSION_SECRET": "your-secret-key", "SESSION_PREFIX": prefix, "EXIT_ON_STDIN_CLOSE": "1"}
		u, err := url.Parse(redisURL)
		require.NoError(t, err)
		if seeds := u.Query()["addr"]; len(seeds) > 0 {
			env["REDIS_CLUSTER"] = strings.Join(append([]string{u.Host}, seeds...), ",")
		} else {
			env["REDIS_URL"] = redisURL
		}
		ex := expresstest.Start(t, env)
		goEnv := realtimeEnv(redisURL)
		goEnv["EXPRESS_SESSION_SECRET"] = "your-secret-key"
		goEnv["EXPRESS_SESSION_PREFIX"] = prefix
		goEnv["SESSION_SECRET"] = strings.Repeat("ignored ", 5)
		base := startReady(t, goEnv)
		ips := newClientIPs()

		for _, tc := range []struct{ name, loginAt, logoutAt string }{
			{"login on Express, logout on Go", "express", "go"},
			{"login on Go, logout on Express", "go", "express"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				goSide := visitor(t, base, ips)
				exSide := &client{t: t, base: ex.URL, hc: goSide.hc} // the same browser
				side := map[string]*client{"go": goSide, "express": exSide}
				code, out := side[tc.loginAt].call(http.MethodPost, "/login", `{"username":"alice","password":"wonderland"}`)
				require.Equal(t, http.StatusOK, code, "%v", out)
				for name, c := range side {
					code, p := c.call(http.MethodGet, "/profile", "")
					require.Equal(t, http.StatusOK, code, name)
					require.EqualValues(t, 1, p["userId"], name)
					require.Equal(t, "alice", p["username"], name)
				}
				code, _ = goSide.call(http.MethodPut, "/preferences", `{"theme":"dark"}`)
				require.Equal(t, http.StatusOK, code)
				_, dump := exSide.call(http.MethodGet, "/session/dump", "")
				require.Contains(t, dump, "isAuthenticated", "Express still has its fields")
				require.Contains(t, strings.Join(mapKeys(dump), ","), "theme", "Go's value reads in Express: %v", dump)

				code, out = goSide.call(http.MethodGet, "/sessions", "")
				require.Equal(t, http.StatusNotImplemented, code, "%v", out)
				require.Contains(t, out["error"], "Express")
				code, out = goSide.call(http.MethodPost, "/logout-all", "")
				require.Equal(t, http.StatusNotImplemented, code, "%v", out)

				code, _ = side[tc.logoutAt].call(http.MethodPost, "/logout", "")
				require.Equal(t, http.StatusOK, code)
				for name, c := range side {
					code, _ := c.call(http.MethodGet, "/profile", "")
					require.Equal(t, http.StatusUnauthorized, code, name)
				}
			})
		}
	})
}

func mapKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k, v := range m {
		keys = append(keys, k)
		if inner, ok := v.(map[string]any); ok {
			keys = append(keys, mapKeys(inner)...)
		}
	}
	return keys
}

// TestExpressSessionConfig: EXPRESS_SESSION_SECRET selects the Express
// mode with the guide's cookie name and prefix (or the overrides), says
// that SESSION_SECRET is ignored, and refuses a secret list that holds
// nothing.
func TestExpressSessionConfig(t *testing.T) {
	tests := []struct {
		name    string
		given   map[string]string
		want    *expressSessions
		wantErr string
		wantLog string
	}{
		{name: "the guide's", given: map[string]string{"EXPRESS_SESSION_SECRET": "your-secret-key"},
			want: &expressSessions{secrets: []string{"your-secret-key"}, prefix: "session:", cookie: "sessionId"}},
		{name: "a list and overrides", given: map[string]string{"EXPRESS_SESSION_SECRET": " new , old ", "EXPRESS_SESSION_PREFIX": "sess:", "EXPRESS_SESSION_COOKIE": "connect.sid"},
			want: &expressSessions{secrets: []string{"new", "old"}, prefix: "sess:", cookie: "connect.sid"}},
		{name: "SESSION_SECRET ignored", given: map[string]string{"EXPRESS_SESSION_SECRET": "s", "SESSION_SECRET": "short"},
			want: &expressSessions{secrets: []string{"s"}, prefix: "session:", cookie: "sessionId"}, wantLog: "SESSION_SECRET is ignored"},
		{name: "empty", given: map[string]string{"EXPRESS_SESSION_SECRET": " , "}, wantErr: "EXPRESS_SESSION_SECRET is set but holds no secret"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var log bytes.Buffer
			cfg, err := loadConfig(envOf(tt.given), slog.New(slog.NewTextHandler(&log, nil)))
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, cfg.express)
			require.NotContains(t, log.String(), "development key", "no warning about a key this mode does not use")
			if tt.wantLog != "" {
				require.Contains(t, log.String(), tt.wantLog)
			}
		})
	}
}
