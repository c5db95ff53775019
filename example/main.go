// Command example is the app of the guide "How to Use Redis with Express.js"
// (shared/reference/redis-with-express.md), in Echo with redisecho: health
// endpoints, the guide's session routes (routes.go), its cached product and
// user API (api.go, with the demo catalogue in Redis and product writes for
// alice, the demo admin, only), its rate limiters (ratelimit.go), and its
// real-time chat, notifications and order updates over Server-Sent Events
// (realtime.go), with a demo page at /. Run it
// with `go run .` in this directory (`go -C example run .` from the
// repository's root): it is a module of its own, so that what only the demo
// needs stays out of the library's go.mod.
//
//	GET /health   readiness: PINGs Redis, 200 or 503 with a JSON report
//	GET /livez    liveness: 200 as long as the process serves HTTP
//
// Both answer HEAD too (load balancers probe with it), from the start,
// while Redis is still unreachable.
//
// Configuration comes from the environment:
//
//	REDIS_URL       any URL rueidis.ParseURL accepts: redis://, rediss://,
//	                several addr= for a cluster, master_set= for sentinel.
//	                Unset: an embedded in-process Redis (miniredis) for a
//	                zero-setup demo.
//	ADDR            listen address. Default ":8080".
//	SESSION_SECRET  comma-separated session key ring, newest first, each key
//	                at least 32 bytes. Unset: a development key, with a loud
//	                warning. Set but holding no key (empty, only commas or
//	                spaces): the app refuses to start.
//	EXPRESS_SESSION_SECRET
//	                set: share sessions with an Express app running the
//	                guide's express-session + connect-redis setup on the
//	                same Redis (the README's migration section): its secret,
//	                or its comma-separated list in express-session's order.
//	                SESSION_SECRET is then ignored. /sessions and
//	                /logout-all answer 501 (Express keeps no per-user index).
//	EXPRESS_SESSION_PREFIX, EXPRESS_SESSION_COOKIE
//	                connect-redis's prefix and express-session's cookie
//	                name. Defaults: the guide's "session:" and "sessionId".
//	COOKIE_INSECURE "1" drops the Secure cookie attribute, for plain-HTTP
//	                development on a host other than localhost. Default: Secure.
//	TRUSTED_PROXIES comma-separated addresses or CIDR ranges of the reverse
//	                proxies in front of the app ("10.0.0.0/8,127.0.0.1").
//	                Set: the client is the nearest address of
//	                X-Forwarded-For that is not one of them. Unset: the
//	                client is the connection's peer and X-Forwarded-For is
//	                ignored, as it should be when clients connect directly
//	                (anyone can send the header). The rate limiters count
//	                requests by this address.
//	RATE_LIMIT_FALLBACK_SHARE
//	                each instance's share of a limit while Redis is down,
//	                for the limiter that then decides in memory
//	                (/api/expensive-operation): 1/N for N instances, in
//	                (0, 1]. Default: 1 (one instance).
//	HTTP_READ_HEADER_TIMEOUT, HTTP_READ_TIMEOUT, HTTP_WRITE_TIMEOUT,
//	HTTP_IDLE_TIMEOUT
//	                the server's timeouts (Go durations, "10s"): to read a
//	                request's header; to read the whole request, body
//	                included; to write the response; and how long a
//	                keep-alive connection may sit idle. Defaults: 5s, 15s,
//	                30s, 60s.
//	SHUTDOWN_TIMEOUT
//	                how long SIGTERM waits for requests in flight before
//	                closing their connections. Default: 10s.
//	JOB_WORKERS     the email worker's concurrency (jobs.go). Default: 5.
//	                0 runs the web app without a worker, so that another
//	                process on the same REDIS_URL works the queue.
//	JOB_LEASE       how long a worker holds a job without a heartbeat
//	                before another may take it over (a Go duration).
//	                Default: redisecho.DefaultJobLease (30s).
//
// The app starts even when Redis is down: it dials in the background,
// logging why each failed dial failed, answers /health with 503 (and the
// reason as a fixed code: auth, protocol, refused, timeout) and every
// Redis-backed route with 503 until Redis answers, then serves the full app
// without a restart. On SIGINT and SIGTERM it stops accepting connections,
// lets the requests in flight finish (up to SHUTDOWN_TIMEOUT) and exits 0.
//
// Every route bounds its body (bodies.go) and the server bounds how long a
// request, a response and an idle connection may take, so that no client
// can hold memory or connections without limit.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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
	go func() {
		<-ctx.Done()
		stop() // a second signal stops the process at once, mid-drain
	}()
	if err := run(ctx, os.LookupEnv, logger, nil); err != nil {
		logger.Error("example stopped", "error", err)
		os.Exit(1)
	}
}

// config is the app's configuration, read from the environment.
type config struct {
	addr           string
	redisURL       string
	sessionKeys    []string
	express        *expressSessions // EXPRESS_SESSION_SECRET set
	insecureCookie bool
	trustedProxies []*net.IPNet
	fallbackShare  float64
	timeouts       timeouts
	jobWorkers     int
	jobLease       time.Duration
	// metrics is what GET /metrics serves (metrics.go): made by run, so
	// that the boot app serves it too; newAppParts makes one when nil.
	metrics *metrics
}

// expressSessions is the Express mode's configuration.
type expressSessions struct {
	secrets        []string
	prefix, cookie string
}

// timeouts are the HTTP server's.
type timeouts struct {
	readHeader, read, write, idle, shutdown time.Duration
}

// defaultTimeouts: a header within 5 s, a whole request (a body of at most
// maxPreferencesBody) within 15 s, a response within 30 s, a minute for an
// idle keep-alive connection, 10 s to drain.
var defaultTimeouts = timeouts{readHeader: 5 * time.Second, read: 15 * time.Second, write: 30 * time.Second, idle: time.Minute, shutdown: 10 * time.Second}

// lookupEnv is os.LookupEnv, injected so tests choose the environment: it
// tells a variable that is set but empty from one that is unset.
type lookupEnv func(string) (string, bool)

func loadConfig(lookup lookupEnv, logger *slog.Logger) (cfg config, err error) {
	getenv := func(k string) string { v, _ := lookup(k); return v }
	cfg = config{addr: getenv("ADDR"), redisURL: getenv("REDIS_URL"), insecureCookie: getenv("COOKIE_INSECURE") == "1"}
	if cfg.addr == "" {
		cfg.addr = ":8080"
	}
	if xs, ok := lookup("EXPRESS_SESSION_SECRET"); ok {
		x := &expressSessions{prefix: "session:", cookie: "sessionId"}
		for _, k := range strings.Split(xs, ",") {
			if k = strings.TrimSpace(k); k != "" {
				x.secrets = append(x.secrets, k)
			}
		}
		if len(x.secrets) == 0 {
			return cfg, errors.New("EXPRESS_SESSION_SECRET is set but holds no secret: set it to the Express app's session secret (comma-separated, in express-session's order)")
		}
		if v, ok := lookup("EXPRESS_SESSION_PREFIX"); ok {
			x.prefix = v
		}
		if v := strings.TrimSpace(getenv("EXPRESS_SESSION_COOKIE")); v != "" {
			x.cookie = v
		}
		cfg.express = x
		if _, ok := lookup("SESSION_SECRET"); ok {
			logger.Info("EXPRESS_SESSION_SECRET is set: sessions are shared with the Express app, and SESSION_SECRET is ignored")
		}
	}
	secret, secretSet := lookup("SESSION_SECRET")
	if cfg.express != nil {
		secret, secretSet = devSessionKey, true
	}
	for _, k := range strings.Split(secret, ",") {
		if k = strings.TrimSpace(k); k != "" {
			cfg.sessionKeys = append(cfg.sessionKeys, k)
		}
	}
	for i, k := range cfg.sessionKeys {
		if len(k) < 32 {
			return cfg, fmt.Errorf("SESSION_SECRET: key %d is %d bytes; each key needs at least 32 (try: openssl rand -base64 32)", i+1, len(k))
		}
	}
	switch {
	case len(cfg.sessionKeys) > 0:
	case secretSet:
		// Most likely a secret that failed to reach the environment (an
		// empty CI variable, a missing file): the development key would
		// let anyone forge sessions.
		return cfg, fmt.Errorf("SESSION_SECRET is set but holds no key (%d bytes of commas and spaces): "+
			"set it to a comma-separated list of keys of at least 32 bytes (openssl rand -base64 32), "+
			"or unset it to use the public development key", len(secret))
	default:
		cfg.sessionKeys = []string{devSessionKey}
		logger.Warn("!!! SESSION_SECRET is unset: session cookies are signed with a PUBLIC development key. " +
			"Anyone can forge them. Set SESSION_SECRET to a comma-separated list of long random keys, newest first.")
	}
	cfg.timeouts = defaultTimeouts
	for _, d := range []struct {
		env string
		dst *time.Duration
	}{
		{"HTTP_READ_HEADER_TIMEOUT", &cfg.timeouts.readHeader},
		{"HTTP_READ_TIMEOUT", &cfg.timeouts.read},
		{"HTTP_WRITE_TIMEOUT", &cfg.timeouts.write},
		{"HTTP_IDLE_TIMEOUT", &cfg.timeouts.idle},
		{"SHUTDOWN_TIMEOUT", &cfg.timeouts.shutdown},
	} {
		v, ok := lookup(d.env)
		if !ok {
			continue
		}
		t, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil || t <= 0 {
			return cfg, fmt.Errorf("%s: want a positive Go duration such as 10s or 500ms; got %q", d.env, v)
		}
		*d.dst = t
	}
	for _, s := range strings.Split(getenv("TRUSTED_PROXIES"), ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if a, aerr := netip.ParseAddr(s); aerr == nil {
			a = a.Unmap().WithZone("")
			p, err = netip.PrefixFrom(a, a.BitLen()), nil
		}
		if err != nil {
			return cfg, fmt.Errorf("TRUSTED_PROXIES: %q is neither an IP address nor a CIDR range", s)
		}
		p = p.Masked()
		cfg.trustedProxies = append(cfg.trustedProxies, &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())})
	}
	if cfg.jobWorkers, err = parseJobWorkers(lookup("JOB_WORKERS")); err != nil {
		return cfg, err
	}
	if v, ok := lookup("JOB_LEASE"); ok {
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil || d < time.Second {
			return cfg, fmt.Errorf("JOB_LEASE: want a Go duration of at least 1s such as 30s; got %q", v)
		}
		cfg.jobLease = d
	}
	cfg.fallbackShare = 1
	if v := getenv("RATE_LIMIT_FALLBACK_SHARE"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f > 0 && f <= 1) {
			return cfg, fmt.Errorf("RATE_LIMIT_FALLBACK_SHARE: want a number in (0, 1], 1/N for N instances; got %q", v)
		}
		cfg.fallbackShare = f
	}
	return cfg, nil
}

// ipExtractor tells Echo who the client is (c.RealIP), and so the rate
// limiters, which count requests by client address. Behind proxies, only
// the listed ones are trusted: Echo's defaults would also trust every
// private, loopback and link-local address, which lets any host on a
// shared private network pose as any client.
func (cfg config) ipExtractor() echo.IPExtractor {
	if len(cfg.trustedProxies) == 0 {
		return echo.ExtractIPDirect()
	}
	opts := []echo.TrustOption{echo.TrustLoopback(false), echo.TrustLinkLocal(false), echo.TrustPrivateNet(false)}
	for _, n := range cfg.trustedProxies {
		opts = append(opts, echo.TrustIPRange(n))
	}
	return echo.ExtractIPFromXFFHeader(opts...)
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

// newBootApp serves until the full app is in place: health endpoints, and
// 503 for everything else. Its readiness stays 503 even once Redis answers,
// until the full app takes over, so a load balancer never routes requests
// to an app that would refuse them. It reads no request body, so it needs
// no body limit: the server discards what a client sends.
func newBootApp(holder *redisecho.ClientHolder, m *metrics) *echo.Echo {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	m.mount(e)
	ready := redisecho.ReadinessWithConfig(redisecho.ReadinessConfig{Holder: holder})
	health := func(c echo.Context) error {
		// Once the client exists the full app is on its way: "starting",
		// never the readiness check, which could answer 200 before the
		// full app serves (the holder stores the client before Ready).
		if holder.Client() != nil {
			return c.JSON(http.StatusServiceUnavailable, map[string]string{"status": "starting"})
		}
		return ready(c)
	}
	probe(e, "/health", health)
	probe(e, "/livez", redisecho.Liveness())
	e.Any("/*", func(c echo.Context) error {
		return c.JSON(http.StatusServiceUnavailable, map[string]string{"error": "starting: Redis is not reachable yet"})
	})
	return e
}

// probe routes GET and HEAD of path to h: load balancers probe with either.
func probe(e *echo.Echo, path string, h echo.HandlerFunc) {
	e.GET(path, h)
	e.HEAD(path, h)
}

// newApp builds the full app on a connected client. It does no I/O: the
// catalogue is seeded before (seedCatalogue).
func newApp(client rueidis.Client, cfg config, logger *slog.Logger) (*echo.Echo, error) {
	a, err := newFullApp(client, cfg, logger)
	if err != nil {
		return nil, err
	}
	return a.e, nil
}

// app is the full app and the parts whose shutdown the server runs when it
// shuts down: the realtime hub (realtime.go) and the job worker (jobs.go).
type app struct {
	e    *echo.Echo
	rt   *realtime
	jobs *jobs
}

// newFullApp is newApp, with the parts to start and shut down.
func newFullApp(client rueidis.Client, cfg config, logger *slog.Logger) (*app, error) {
	e, rt, jobs, err := newAppParts(client, cfg, logger)
	if err != nil {
		return nil, err
	}
	return &app{e: e, rt: rt, jobs: jobs}, nil
}

func newAppParts(client rueidis.Client, cfg config, logger *slog.Logger) (*echo.Echo, *realtime, *jobs, error) {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.IPExtractor = cfg.ipExtractor()
	e.Use(limitBodies)
	probe(e, "/health", redisecho.Readiness(client))
	probe(e, "/livez", redisecho.Liveness())

	if cfg.metrics == nil {
		m, err := newMetrics()
		if err != nil {
			return nil, nil, nil, err
		}
		cfg.metrics = m
	}
	// /metrics sits outside the /api limiter: a scraper is not a client.
	cfg.metrics.mount(e)
	opts := redisecho.Options{Logger: logger, Observer: cfg.metrics.obs}
	var sessions echo.MiddlewareFunc
	var err error
	if x := cfg.express; x != nil {
		// The guide's express-session options, so that both apps read
		// and write the same sessions and set the same cookie.
		sessions, err = redisecho.ExpressSessionConfig{
			Client: client, Options: opts, Secrets: x.secrets, CookieName: x.cookie, KeyPrefix: x.prefix,
			Cookie: redisecho.ExpressCookie{MaxAge: 24 * time.Hour, SameSite: http.SameSiteLaxMode, Secure: !cfg.insecureCookie},
		}.ToMiddleware()
	} else {
		sessions, err = redisecho.SessionConfig{
			Client:          client,
			Options:         opts,
			Keys:            cfg.sessionKeys,
			InsecureCookie:  cfg.insecureCookie,
			RecordUserAgent: true,
		}.ToMiddleware()
	}
	if err != nil {
		return nil, nil, nil, err
	}
	// The guide's rate limiters (ratelimit.go). The /api limiter is the
	// group's middleware, so it runs first on every /api route, before the
	// route's own limiter and before the cache: cache hits count too.
	limits, err := newRateLimits(client, cfg, opts)
	if err != nil {
		return nil, nil, nil, err
	}
	rt, err := newRealtime(client, opts)
	if err != nil {
		return nil, nil, nil, err
	}
	auth := e.Group("", sessions)
	// The guide limits only /api/auth/login; POST /login shares its
	// counter, or it would be the way around it. A login that creates a
	// session (the visitor had none) counts as a new session too: the
	// login limiter gives successes back, and the demo's passwords are
	// public.
	auth.POST("/login", login, limits.login, limits.newLoginSession)
	auth.GET("/profile", profile)
	// Logging out ends the user's open streams (realtime.endStreams).
	auth.POST("/logout", logout, rt.endStreams)
	auth.GET("/sessions", listSessions)
	auth.POST("/logout-all", logoutAll, rt.endStreams)
	// The one route that creates anonymous sessions: each creation is
	// counted per client address (with the logins that create one); a
	// visitor with a session is not.
	auth.PUT("/preferences", putPreferences, limits.newSession)
	auth.GET("/preferences", getPreferences)

	api := e.Group("/api", limits.api)
	// The same login as POST /login, behind the guide's authLimiter, which
	// runs before the session: a refused attempt costs no session work.
	api.POST("/auth/login", login, limits.login, sessions, limits.newLoginSession)
	// The session runs first: the limiter keys logged-in users by their ID.
	api.GET("/expensive-operation", expensiveOperation, sessions, limits.expensive)
	if err := mountAPI(api, client, opts, sessions); err != nil {
		return nil, nil, nil, err
	}
	// The guide's email queue, behind the same /api limiter; its events
	// reach the user's stream through the hub.
	jobs, err := newJobs(client, opts, rt.hub, cfg.jobWorkers, cfg.jobLease, logger)
	if err != nil {
		return nil, nil, nil, err
	}
	jobs.mount(api, sessions)
	// The guide's chat, notifications and orders over SSE, and the demo
	// page.
	if err := rt.mount(e, auth); err != nil {
		return nil, nil, nil, err
	}
	return e, rt, jobs, nil
}

// seedCatalogue writes the demo products that are missing, retrying every
// second until it succeeds or ctx is done.
func seedCatalogue(ctx context.Context, client rueidis.Client, logger *slog.Logger) error {
	db := newCatalogue(client)
	for {
		err := db.seed(ctx)
		if err == nil {
			return nil
		}
		logger.Warn("cannot seed the demo catalogue yet", "error", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// logDialFailures logs, while the holder is connecting, each new reason a
// dial failed for (a wrong password, a port that is not Redis, a refused
// or timed-out connection), until it connects or ctx is done.
func logDialFailures(ctx context.Context, holder *redisecho.ClientHolder, logger *slog.Logger) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last string
	for {
		select {
		case <-holder.Ready():
			logger.Info("connected to Redis", "mode", holder.Client().Mode())
			return
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		err := holder.Err()
		if err == nil || err.Error() == last {
			continue
		}
		last = err.Error()
		logger.Error("cannot connect to Redis yet; retrying", "reason", redisecho.DialErrorCode(err), "error", err)
	}
}

// run serves the app until ctx is done, then shuts down gracefully. When
// listening is not nil it receives the bound address once the app serves.
func run(ctx context.Context, lookup lookupEnv, logger *slog.Logger, listening chan<- string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // whatever ends run ends its goroutines
	cfg, err := loadConfig(lookup, logger)
	if err != nil {
		return err
	}
	opt, stopRedis, err := redisOption(cfg, logger)
	if err != nil {
		return err
	}
	defer stopRedis()

	if cfg.metrics, err = newMetrics(); err != nil {
		return err
	}
	holder := redisecho.NewClientHolder(opt)
	holder.Start()
	defer holder.Close()
	go logDialFailures(ctx, holder, logger)

	// Until Redis answers, a boot app serves; then the full app takes over.
	var handler atomic.Pointer[http.Handler]
	var boot http.Handler = newBootApp(holder, cfg.metrics)
	handler.Store(&boot)
	tm := cfg.timeouts
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { (*handler.Load()).ServeHTTP(w, r) }),
		// ReadTimeout bounds the whole request, body included (a client
		// sending a byte every few seconds is cut off), and WriteTimeout
		// the response. Long-lived responses (the SSE streams of
		// realtime.go) clear both deadlines on their connection
		// (http.ResponseController's SetReadDeadline and SetWriteDeadline
		// with a zero time), or the server would cut them after these.
		ReadHeaderTimeout: tm.readHeader,
		ReadTimeout:       tm.read,
		WriteTimeout:      tm.write,
		IdleTimeout:       tm.idle,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	appErr := make(chan error, 1)
	// partsStopped is closed once the full app's hub and worker stopped;
	// run waits for it after the server's shutdown, when they started.
	partsStopped := make(chan struct{})
	var partsStarted atomic.Bool
	go func() {
		select {
		case <-holder.Ready():
		case <-ctx.Done():
			return
		}
		if seedCatalogue(ctx, holder.Client(), logger) != nil {
			return // shutting down
		}
		a, err := newFullApp(holder.Client(), cfg, logger)
		if err == nil {
			err = a.jobs.start()
		}
		if err != nil {
			appErr <- err
			return
		}
		// The server's shutdown waits for the requests in flight, and an
		// SSE stream never ends by itself: the hub ends them all (each
		// with a last "disconnect" event) as soon as the shutdown starts.
		// The worker stops with the server too: running emails finish
		// within the shutdown timeout or go back to the queue.
		var once sync.Once
		stopParts := func() {
			once.Do(func() {
				done := make(chan struct{})
				go func() { a.jobs.shutdown(tm.shutdown); close(done) }()
				a.rt.shutdown(tm.shutdown)
				<-done
				close(partsStopped)
			})
		}
		srv.RegisterOnShutdown(stopParts)
		partsStarted.Store(true)
		var h http.Handler = a.e
		handler.Store(&h)
		if ctx.Err() != nil {
			// The shutdown may have started before the hook was
			// registered: stop them anyway (twice is harmless).
			go stopParts()
		}
	}()

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	logger.Info("example listening", "addr", ln.Addr().String())
	if listening != nil {
		listening <- ln.Addr().String()
	}

	select {
	case err := <-served:
		return err
	case err := <-appErr:
		_ = srv.Close()
		return err
	case <-ctx.Done():
	}
	logger.Info("shutting down: draining requests", "within", tm.shutdown)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), tm.shutdown)
	defer cancel()
	var shutdownErr error
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		// Requests still running at the deadline are cut off: say so,
		// and stop anyway.
		_ = srv.Close()
		shutdownErr = fmt.Errorf("shutdown: requests still running after %v were cut off: %w", tm.shutdown, err)
	}
	if partsStarted.Load() {
		// The worker's jobs finish, or go back to the queue, before the
		// process exits (and before the caller closes the client they
		// use), even when requests had to be cut off.
		select {
		case <-partsStopped:
		case <-time.After(tm.shutdown + time.Second):
			logger.Warn("shutdown: the hub or the job worker did not stop in time")
		}
	}
	if shutdownErr != nil {
		return shutdownErr
	}
	logger.Info("stopped")
	return nil
}
