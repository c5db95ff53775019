package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

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

	base := startExample(t, map[string]string{"REDIS_URL": "redis://" + addr, "SESSION_SECRET": "k1,k2"})
	code, took := status(t, base+"/health")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Less(t, took, 2*time.Second)
	code, _ = status(t, base+"/livez")
	require.Equal(t, http.StatusOK, code)
}

func TestSessionKeyRing(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg := loadConfig(func(k string) string { return map[string]string{"SESSION_SECRET": " new , old ,"}[k] }, logger)
	require.Equal(t, []string{"new", "old"}, cfg.sessionKeys)
	require.Equal(t, ":8080", cfg.addr)
	cfg = loadConfig(func(string) string { return "" }, logger)
	require.Equal(t, []string{devSessionKey}, cfg.sessionKeys)
}

func TestBadRedisURL(t *testing.T) {
	err := run(context.Background(), func(k string) string { return map[string]string{"REDIS_URL": "http://nope", "ADDR": "127.0.0.1:0"}[k] },
		slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	require.ErrorContains(t, err, "REDIS_URL")
}
