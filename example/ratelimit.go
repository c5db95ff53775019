package main

import (
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"

	"github.com/redisecho/redisecho"
)

// rateLimits are the guide's limiters ("Rate Limiting"), one
// redisecho.RateLimit middleware each:
//
//	/api/*                        100 requests per minute per client IP (apiLimiter)
//	POST /api/auth/login          5 failed attempts per 15 minutes per client IP (authLimiter)
//	GET /api/expensive-operation  10 per minute per user, or per client IP when
//	                              anonymous (the custom sliding-window limiter)
//	PUT /preferences, logins      30 new sessions per 10 minutes per client IP
//	                              (not in the guide: each session holds Redis
//	                              memory for its idle timeout; a login counts
//	                              only when the visitor had no session, since
//	                              one on a live session replaces it)
//
// Each has its own Name, so their counters never share a Redis key, even for
// the same client. Clients are told apart by c.RealIP(): see
// config.ipExtractor and TRUSTED_PROXIES.
type rateLimits struct {
	api, login, expensive, newSession echo.MiddlewareFunc
	// newLoginSession counts what newSession counts, for the logins,
	// without rate-limit headers of its own.
	newLoginSession echo.MiddlewareFunc
}

// newSessionsPerClient is how many sessions one client address may create
// per newSessionWindow, anonymous ones (PUT /preferences) and logins
// together: a visitor's first preference or login creates one, the
// visitor's later requests carry its cookie and are not counted, so this
// bounds only a client that throws its cookies away.
const (
	newSessionsPerClient = 30
	newSessionWindow     = 10 * time.Minute
)

func newRateLimits(client rueidis.Client, cfg config, opts redisecho.Options) (rateLimits, error) {
	var rl rateLimits
	var err error
	rl.api, err = redisecho.RateLimitConfig{
		Client:   client,
		Options:  opts,
		Name:     "api",
		Policies: []redisecho.Policy{redisecho.PerMinute(100)},
		// Fail open, as the guide's limiters do: the routes behind it are
		// cheap reads (most of them cached), and an outage of the limiter
		// should not become an outage of the whole API.
		OnRedisError: redisecho.FailOpen,
		// The guide's standardHeaders: true, legacyHeaders: false.
		DisableLegacyHeaders: true,
	}.ToMiddleware()
	if err != nil {
		return rl, err
	}
	rl.login, err = redisecho.RateLimitConfig{
		Client:  client,
		Options: opts,
		Name:    "auth",
		// A fixed window from the first attempt, as express-rate-limit
		// counts it.
		Policies: []redisecho.Policy{{Algorithm: redisecho.FixedWindow, Limit: 5, Window: 15 * time.Minute}},
		// Successful logins are given back: only failures count.
		SkipSuccessfulRequests: true,
		// Fail closed: failing open would leave password guessing unlimited
		// while Redis is down (and a wrong password answers 401 where a
		// right one fails on the session store, so guesses can still be
		// checked). It costs nothing, since a login cannot store its
		// session without Redis anyway.
		OnRedisError: redisecho.FailClosed,
		Message:      map[string]string{"error": "Too many login attempts, please try again later."},
	}.ToMiddleware()
	if err != nil {
		return rl, err
	}
	rl.expensive, err = redisecho.RateLimitConfig{
		Client:  client,
		Options: opts,
		Name:    "expensive",
		// The exact sliding window: the guide's sorted-set limiter.
		Policies: []redisecho.Policy{{Algorithm: redisecho.SlidingLog, Limit: 10, Window: time.Minute}},
		KeyFunc:  redisecho.UserOrIPKey(sessionUserID, redisecho.DefaultIPv6Prefix),
		// Decide in memory while Redis is down: the operation stays
		// available and stays protected, each instance granting its share
		// (RATE_LIMIT_FALLBACK_SHARE) of the limit.
		OnRedisError:  redisecho.LocalFallback,
		FallbackShare: cfg.fallbackShare,
		Message:       map[string]string{"error": "Too many requests"},
	}.ToMiddleware()
	if err != nil {
		return rl, err
	}
	// One limiter, one count per address, behind two middlewares: PUT
	// /preferences sends its headers, the logins do not (theirs are the
	// login limiter's).
	sessions, err := redisecho.NewLimiter(redisecho.LimiterConfig{
		Client:   client,
		Options:  opts,
		Name:     "new-session",
		Policies: []redisecho.Policy{{Algorithm: redisecho.FixedWindow, Limit: newSessionsPerClient, Window: newSessionWindow}},
		// Without Redis no session can be created anyway: 503.
		OnRedisError: redisecho.FailClosed,
		// Refunds (below) need the script path.
		DisableFreePath: true,
	})
	if err != nil {
		return rl, err
	}
	newSession := func(headers bool) (echo.MiddlewareFunc, error) {
		return redisecho.RateLimitConfig{
			Limiter: sessions,
			// Only requests that create a session count: the Session
			// middleware ran before, so a request with a live session is
			// skipped, and one that ends without a new session cookie (a
			// refused body or login, a write of nothing, a failure) is
			// given back.
			Skipper:              func(c echo.Context) bool { return !createsSession(c) },
			SkipFailedRequests:   true,
			RequestWasSuccessful: setSessionCookie,
			DisableDraftHeaders:  !headers,
			DisableLegacyHeaders: !headers,
			Message:              map[string]string{"error": "Too many new sessions from this address, please try again later."},
		}.ToMiddleware()
	}
	if rl.newSession, err = newSession(true); err != nil {
		return rl, err
	}
	rl.newLoginSession, err = newSession(false)
	return rl, err
}

// setSessionCookie reports whether the request succeeded and its response
// sets the session cookie (the example keeps its default name): the
// session was stored.
func setSessionCookie(c echo.Context, err error) bool {
	if err != nil || c.Response().Status >= 400 {
		return false
	}
	for _, v := range c.Response().Header().Values(echo.HeaderSetCookie) {
		if strings.HasPrefix(v, redisecho.DefaultSessionCookie+"=") && !strings.Contains(v, "Max-Age=0") {
			return true
		}
	}
	return false
}

// createsSession reports whether the request has no live session, so that
// a write would create one. A session that cannot be loaded (Redis down)
// counts as none: the limiter then fails closed, as the session would.
func createsSession(c echo.Context) bool {
	s, err := redisecho.GetSession(c)
	return err == nil && s.IsNew()
}

// sessionUserID is the logged-in user's ID for UserOrIPKey, or "" for an
// anonymous visitor. The Session middleware must run before the limiter;
// without it every visitor would count as anonymous.
func sessionUserID(c echo.Context) string {
	if _, id, ok := current(c); ok {
		return strconv.Itoa(id)
	}
	return ""
}

// expensiveOperation stands for work worth limiting per user.
func expensiveOperation(c echo.Context) error {
	return c.JSON(http.StatusOK, map[string]string{"result": "done"})
}
