package main

import (
	"context"
	"net/http"
	"net/http/httptest"

	"github.com/labstack/echo/v4"
)

// A Case is one benchmarked route.
//
// The harness registers every case on one Echo instance, calls Setup once
// the server listens, checks that the route answers 2xx with the same body
// as its baseline (or, when Status is set, that it answers Status), then
// runs wrk against Path with the headers Setup returned.
type Case struct {
	// Name identifies the case in the table and in -cases; it must be
	// unique. The case's Redis key prefix is derived from it (Env.KeyPrefix).
	Name string
	// Baseline is the path of the baseline route the case is compared with:
	// "/n" or "/p". The case must answer the same body.
	Baseline string
	// Method is the HTTP method wrk sends; empty means GET.
	Method string
	// Path is the route wrk hits; it must be unique across cases.
	Path string
	// Register adds the case's route, inside its own group with its own
	// middleware, and creates its clients (register their Close with
	// env.OnClose).
	Register func(e *echo.Echo, env *Env) error
	// Setup, optional, prepares the case once the server is up (warms a
	// cache, logs in) and returns headers for every wrk request.
	Setup func(ctx context.Context, env *Env) (http.Header, error)
	// Redis, optional, lists the Redis servers the case uses, whose
	// commands are counted. Nil means the default server (env.Redis).
	Redis func(env *Env) []string
	// Status is the status every response must have; 0 means 2xx with the
	// baseline's body. A case that sets it (a route that answers 429, say)
	// is still compared with its baseline's req/s, but its body is not
	// checked, and wrk runs a Lua script whose response callback counts
	// the responses with another status: they, not wrk's non-2xx/3xx
	// count, make the case broken.
	Status int
}

// baselines are the reference routes: no middleware, no Redis. They run in
// every round, before the cases.
var baselines = []Case{
	{Name: "baseline /n", Baseline: "/n", Path: "/n", Register: func(*echo.Echo, *Env) error { return nil }},
	{Name: "baseline /p", Baseline: "/p", Path: "/p", Register: func(*echo.Echo, *Env) error { return nil }},
}

// cases is the registry, run in this order.
//
// redisecho cases go here as well, next to the peer they compete with (for
// example "redisecho session/write" after "scs/write"), with Register using
// the redisecho middleware. go.mod already replaces the root module with
// ../; the first case to import github.com/redisecho/redisecho adds the
// require (go mod tidy does it).
var cases = []Case{
	// Sessions, baseline /n. Write: one value per request into an existing
	// session. Read: one value from a live session.
	redistoreCase("redistore/write", "/redistore/write", true),
	redistoreCase("redistore/read", "/redistore/read", false),
	scsCase("scs/write", "/scs/write", true),
	scsCase("scs/read", "/scs/read", false),
	redisechoSessionCase("redisecho session/write", "/redisecho/session/write", true),
	redisechoSessionCase("redisecho session/read", "/redisecho/session/read", false),

	// Rate limiting, baseline /p. Allow: one check per request (GCRA),
	// never denied. Rejected: a key blocked for an hour, every request
	// answered 429 by redisecho's free path (process memory, no Redis),
	// compared with the same route without a limiter.
	redisRateCase("redis_rate/allow", "/redis_rate/allow"),
	redisechoRateCase("redisecho ratelimit/allow", "/redisecho/ratelimit/allow"),
	redisechoRejectedCase("redisecho ratelimit/rejected (free path)", "/redisecho/ratelimit/rejected"),

	// Caching, baseline /p: a warm cache hit answering the /p body
	// (go-redis/cache: cache-aside of the data, rendered by the handler;
	// the guide: a response cache sending the stored JSON; redisecho: a
	// response cache read through client-side caching). The precomputed
	// body, no Redis, is the ceiling a response cache hit is held to.
	precomputedCase("precomputed body (no Redis)", "/precomputed/p"),
	goRedisCacheCase("go-redis-cache-tinylfu/hit", "/go-redis-cache/hit"),
	guideCacheCase("guide-cache/hit", "/guide-cache/hit"),
	redisechoCacheCase("redisecho cache/hit", "/redisecho/cache/hit"),
}

// precomputedCase: the /p route answering a body rendered once at Register
// (by handleP itself, so it is byte for byte the baseline's) with
// c.JSONBlob: no Redis, no encoding per request. It is what a response
// cache hit would cost if the cache were free.
func precomputedCase(name, path string) Case {
	return Case{
		Name: name, Baseline: "/p", Path: path,
		Register: func(e *echo.Echo, _ *Env) error {
			rec := httptest.NewRecorder()
			if err := handleP(e.NewContext(httptest.NewRequest(http.MethodGet, "/p", nil), rec)); err != nil {
				return err
			}
			body := rec.Body.Bytes()
			e.Group(path).GET("", func(c echo.Context) error {
				return c.JSONBlob(http.StatusOK, body)
			})
			return nil
		},
	}
}
