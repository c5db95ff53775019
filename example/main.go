// Command example is the app of the guide "How to Use Redis with Express.js"
// (shared/reference/redis-with-express.md), in Echo with redisecho. It grows
// feature by feature; today it serves the health endpoints:
//
//	GET /health   readiness: PINGs Redis, 200 or 503 with a JSON report
//	GET /livez    liveness: 200 as long as the process serves HTTP
//
// Configuration comes from the environment:
//
//	REDIS_URL       any URL rueidis.ParseURL accepts: redis://, rediss://,
//	                several addr= for a cluster, master_set= for sentinel.
//	                Unset: an embedded in-process Redis (miniredis) for a
//	                zero-setup demo.
//	ADDR            listen address. Default ":8080".
//	SESSION_SECRET  comma-separated session key ring, newest first. Unset: a
//	                development key, with a loud warning.
//
// The app starts even when Redis is down: it dials in the background and
// answers /health with 503 until Redis answers. It shuts down gracefully on
// SIGINT and SIGTERM.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"

	"github.com/redisecho/redisecho"
)

// devSessionKey signs session cookies when SESSION_SECRET is unset. It is
// public, so cookies signed with it can be forged: development only.
const devSessionKey = "redisecho-example-development-key-do-not-use-in-production"

func main() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Getenv, logger, nil); err != nil {
		logger.Error("example stopped", "error", err)
		os.Exit(1)
	}
}

// config is the app's configuration, read from the environment.
type config struct {
	addr        string
	redisURL    string
	sessionKeys []string
}

func loadConfig(getenv func(string) string, logger *slog.Logger) config {
	cfg := config{addr: getenv("ADDR"), redisURL: getenv("REDIS_URL")}
	if cfg.addr == "" {
		cfg.addr = ":8080"
	}
	for _, k := range strings.Split(getenv("SESSION_SECRET"), ",") {
		if k = strings.TrimSpace(k); k != "" {
			cfg.sessionKeys = append(cfg.sessionKeys, k)
		}
	}
	if len(cfg.sessionKeys) == 0 {
		cfg.sessionKeys = []string{devSessionKey}
		logger.Warn("!!! SESSION_SECRET is unset: session cookies are signed with a PUBLIC development key. " +
			"Anyone can forge them. Set SESSION_SECRET to a comma-separated list of long random keys, newest first.")
	}
	return cfg
}

// redisOption returns the rueidis options for REDIS_URL, or starts the
// embedded server when it is unset. stop releases what it started.
func redisOption(cfg config, logger *slog.Logger) (opt rueidis.ClientOption, stop func(), err error) {
	if cfg.redisURL != "" {
		opt, err = rueidis.ParseURL(cfg.redisURL)
		if err != nil {
			return opt, nil, fmt.Errorf("REDIS_URL: %w", err)
		}
		return opt, func() {}, nil
	}
	m := miniredis.NewMiniRedis()
	if err := m.StartAddr("127.0.0.1:0"); err != nil {
		return opt, nil, fmt.Errorf("embedded redis: %w", err)
	}
	m.ClockTTL(true) // keys expire in real time, as on a real server
	logger.Warn("REDIS_URL is unset: using an embedded in-process Redis (miniredis) at "+m.Addr()+". "+
		"It has no client-side caching (every cached read is a round trip), keeps data in memory only "+
		"and is not Redis: use it for a first look, never in production. "+
		"Point the app at a real server with REDIS_URL=redis://127.0.0.1:6379/0", "addr", m.Addr())
	// miniredis speaks RESP2 only and has no CLIENT TRACKING or cluster
	// commands: see shared/notes/rueidis.md.
	opt = rueidis.ClientOption{
		InitAddress:       []string{m.Addr()},
		DisableCache:      true,
		AlwaysRESP2:       true,
		ForceSingleClient: true,
	}
	return opt, m.Close, nil
}

// newApp builds the Echo app around the Redis holder.
func newApp(holder *redisecho.ClientHolder) *echo.Echo {
	e := echo.New()
	e.HideBanner = true
	e.HidePort = true
	e.GET("/health", redisecho.ReadinessWithConfig(redisecho.ReadinessConfig{Holder: holder}))
	e.GET("/livez", redisecho.Liveness())
	return e
}

// run serves the app until ctx is done, then shuts down gracefully. When
// listening is not nil it receives the bound address once the app serves.
func run(ctx context.Context, getenv func(string) string, logger *slog.Logger, listening chan<- string) error {
	cfg := loadConfig(getenv, logger)
	opt, stopRedis, err := redisOption(cfg, logger)
	if err != nil {
		return err
	}
	defer stopRedis()

	holder := redisecho.NewClientHolder(opt)
	holder.Start()
	defer holder.Close()
	go func() {
		select {
		case <-holder.Ready():
			logger.Info("connected to Redis", "mode", holder.Client().Mode())
		case <-ctx.Done():
		}
	}()

	e := newApp(holder)
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: e, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	logger.Info("example listening", "addr", ln.Addr().String())
	if listening != nil {
		listening <- ln.Addr().String()
	}

	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	logger.Info("shutting down: draining requests for up to 10 s")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
