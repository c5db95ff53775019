package redisecho

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"
)

// Rate limiting: the Redis side (Limiter, usable outside HTTP) comes first,
// the Echo middleware (RateLimit) after it.

// Algorithm is how a Policy counts requests.
type Algorithm uint8

const (
	// SlidingWindow is the sliding-window counter, the default: two counters
	// (this aligned window and the previous one), the previous one weighted
	// by how much of it the rolling window still covers. Its memory per key
	// is constant.
	//
	// It is an approximation. Each aligned window (the clock cut into
	// Window-long slices) admits at most Limit. A rolling window admits at
	// most Limit×(1+f), f being the part of the current aligned window that
	// has passed, so always fewer than 2×Limit; that worst case needs a full
	// Limit burst right before a boundary. When the previous window's
	// requests were spread evenly, it is exact.
	SlidingWindow Algorithm = iota
	// FixedWindow counts requests in a window that starts at the key's first
	// hit and lasts Window, as rate-limit-redis does. A client can send
	// 2×Limit in a short time around a window's end.
	FixedWindow
	// SlidingLog is the exact sliding window: a sorted set holding the time
	// of every admitted request of the last Window. Any rolling window of
	// length Window admits at most Limit. Only admitted requests are
	// recorded, so a key holds at most Limit entries and a client that keeps
	// hammering recovers as soon as it stops. Memory grows with Limit.
	SlidingLog
	// TokenBucket is GCRA (the generic cell rate algorithm): a bucket of
	// Burst tokens refilled at Limit per Window, one token every
	// Window/Limit (the emission interval). A burst of Burst requests is
	// admitted back to back, then one per emission interval. One timestamp
	// per key.
	TokenBucket
)

// String returns the algorithm's name.
func (a Algorithm) String() string {
	switch a {
	case SlidingWindow:
		return "sliding-window"
	case FixedWindow:
		return "fixed-window"
	case SlidingLog:
		return "sliding-log"
	case TokenBucket:
		return "token-bucket"
	}
	return "Algorithm(" + strconv.Itoa(int(a)) + ")"
}

// Policy is one limit: Limit units of cost per Window, counted by Algorithm.
type Policy struct {
	// Name identifies the policy in the RateLimit and RateLimit-Policy
	// headers; printable ASCII. Default: "<Limit>-per-<Window>", followed
	// by "-<Algorithm>" unless it is SlidingWindow: "100-per-1m",
	// "5-per-15m-fixed-window".
	Name string
	// Algorithm counts requests. Default: SlidingWindow.
	Algorithm Algorithm
	// Limit is the number of units (requests, at cost 1) allowed per
	// Window. Required, at least 1.
	Limit int64
	// Window is the period of Limit. Required, at least 1 ms.
	Window time.Duration
	// Burst is the bucket size of a TokenBucket policy; other algorithms
	// ignore it. Default: Limit.
	Burst int64
}

// PerSecond, PerMinute and PerHour return a SlidingWindow policy of limit
// requests per period.
func PerSecond(limit int64) Policy { return Policy{Limit: limit, Window: time.Second} }

// PerMinute returns a SlidingWindow policy of limit requests per minute.
func PerMinute(limit int64) Policy { return Policy{Limit: limit, Window: time.Minute} }

// PerHour returns a SlidingWindow policy of limit requests per hour.
func PerHour(limit int64) Policy { return Policy{Limit: limit, Window: time.Hour} }

// capacity is the largest cost one request can have under p.
func (p Policy) capacity() int64 {
	if p.Algorithm == TokenBucket {
		return p.Burst
	}
	return p.Limit
}

// FailurePolicy is what a Limiter does when Redis cannot decide: a call
// failed, timed out, or the circuit breaker is open.
type FailurePolicy uint8

const (
	// FailOpen allows the request and logs the error (at most once per
	// second). It is the default, as in the guide's limiters: an outage of
	// the limiter does not become an outage of the site.
	FailOpen FailurePolicy = iota
	// FailClosed refuses the request: Allow returns ErrLimiterUnavailable,
	// which the middleware answers with 503, not 429.
	FailClosed
	// LocalFallback decides in process memory, with each policy's Limit
	// (and Burst) scaled by FallbackShare, so that N instances together
	// stay near the global limit instead of granting N times it.
	LocalFallback
)

// String returns the policy's name.
func (f FailurePolicy) String() string {
	switch f {
	case FailOpen:
		return "fail-open"
	case FailClosed:
		return "fail-closed"
	case LocalFallback:
		return "local-fallback"
	}
	return "FailurePolicy(" + strconv.Itoa(int(f)) + ")"
}

// Rate limiter errors.
var (
	// ErrInvalidLimiterConfig is returned for an invalid LimiterConfig,
	// Policy or RateLimitConfig.
	ErrInvalidLimiterConfig = errors.New("redisecho: rate limit: invalid configuration")
	// ErrInvalidLimiterKey is returned by Allow for an empty key.
	ErrInvalidLimiterKey = errors.New("redisecho: rate limit: empty key")
	// ErrCostTooHigh is returned by AllowN for a cost that no policy
	// could ever admit (above a Limit, or a Burst for TokenBucket).
	ErrCostTooHigh = errors.New("redisecho: rate limit: cost exceeds the policy's capacity")
	// ErrLimiterUnavailable is returned by a FailClosed limiter when Redis
	// cannot decide.
	ErrLimiterUnavailable = errors.New("redisecho: rate limit: Redis unavailable")
)

// Decision is the outcome of one rate-limit check. It is meaningful outside
// HTTP too (a job, a websocket message): Allowed says whether to go on,
// RetryAfter when to try again.
type Decision struct {
	// Allowed reports whether the request was admitted (and its cost
	// consumed under every policy). A denied request consumes nothing.
	Allowed bool
	// Limit, Remaining and Reset describe the binding policy: the one with
	// the fewest units left when allowed, the one that denied longest when
	// denied.
	Limit int64
	// Remaining is the number of units the binding policy has left now.
	Remaining int64
	// Reset is the time until the binding policy's quota is whole again,
	// if no more requests come.
	Reset time.Duration
	// RetryAfter, when denied, is the time until the same request would be
	// admitted, if no others come. Zero when allowed.
	RetryAfter time.Duration
	// Policies holds one entry per policy, in the order given.
	Policies []PolicyDecision
	// Time is when the decision was taken: Redis TIME, or the local clock
	// when Degraded or decided by the free path.
	Time time.Time
	// Cost is the number of units the request asked for.
	Cost int64
	// Degraded reports a decision taken without Redis, by the limiter's
	// FailurePolicy (FailOpen or LocalFallback).
	Degraded bool
	// FromMemory reports a denial by the free path: the key was known to be
	// blocked, and Redis was not asked.
	FromMemory bool

	key    string
	tokens []string // per policy: what Refund needs to undo the cost
}

// PolicyDecision is one policy's part of a Decision.
type PolicyDecision struct {
	Policy Policy
	// Allowed reports whether this policy alone would admit the request.
	Allowed bool
	// Remaining is the number of units left under the policy.
	Remaining int64
	// Reset is the time until the policy's quota is whole again.
	Reset time.Duration
	// RetryAfter, when this policy refuses, is the time until it would
	// admit the request.
	RetryAfter time.Duration
}

// LimiterConfig configures a Limiter.
type LimiterConfig struct {
	// Client is the rueidis client. Required.
	Client rueidis.Client
	// Options is the shared plumbing (Prefix, Timeout, Breaker, Clock,
	// Logger). The Clock drives the free path and the local fallback only;
	// windows run on Redis TIME.
	Options
	// Name separates this limiter's counters from other limiters' on the
	// same key. Default: "default".
	Name string
	// Policies are decided together: a request must pass every one, and a
	// request denied by one consumes none. Required, unless every call
	// gives its own (AllowPolicies). No two may share an Algorithm and a
	// Window, or a Name.
	Policies []Policy
	// OnRedisError is the FailurePolicy. Default: FailOpen.
	OnRedisError FailurePolicy
	// FallbackShare is each instance's share of every limit under
	// LocalFallback, in (0, 1]: 0.25 for four instances. Required with
	// LocalFallback.
	FallbackShare float64
	// DisableFreePath turns the free path off. With the free path, a key
	// denied until a known time is denied again from process memory until
	// then, without a Redis call, for any cost at least the denied one.
	// That is exact only while nothing gives units back: turn it off when
	// you Refund (a refund on another instance unblocks the key there, not
	// here) or Reset keys on other instances. Default: false (on).
	DisableFreePath bool
}

// Limiter decides rate limits in Redis. Each decision is one Lua script in
// one round trip over the key's own hash (plus one sorted set per
// SlidingLog policy, under the same hash tag), timed by Redis TIME, so
// every instance agrees whatever its clock. Create it with NewLimiter; it
// is safe for concurrent use.
type Limiter struct {
	b        *backend
	name     string
	policies []Policy
	onError  FailurePolicy
	share    float64
	freePath bool

	blocks blockMap
	local  *localLimiter
}

// NewLimiter validates cfg and returns the limiter. It does no I/O.
func NewLimiter(cfg LimiterConfig) (*Limiter, error) {
	b, err := newBackend("rate limit", cfg.Client, cfg.Options)
	if err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = "default"
	}
	pols, err := normalizePolicies(cfg.Policies)
	if err != nil {
		return nil, err
	}
	switch cfg.OnRedisError {
	case FailOpen, FailClosed:
	case LocalFallback:
		if !(cfg.FallbackShare > 0 && cfg.FallbackShare <= 1) {
			return nil, fmt.Errorf("%w: FallbackShare must be in (0, 1] with LocalFallback, got %v", ErrInvalidLimiterConfig, cfg.FallbackShare)
		}
	default:
		return nil, fmt.Errorf("%w: unknown OnRedisError %d", ErrInvalidLimiterConfig, cfg.OnRedisError)
	}
	l := &Limiter{
		b:        b,
		name:     cfg.Name,
		policies: pols,
		onError:  cfg.OnRedisError,
		share:    cfg.FallbackShare,
		freePath: !cfg.DisableFreePath,
	}
	l.blocks.clock = b.clock
	if l.onError == LocalFallback {
		l.local = &localLimiter{clock: b.clock, share: cfg.FallbackShare, keys: map[string]*localKey{}}
	}
	return l, nil
}

// normalizePolicies validates policies and fills their defaults, in a copy.
func normalizePolicies(in []Policy) ([]Policy, error) {
	out := make([]Policy, len(in))
	names := map[string]bool{}
	kinds := map[string]bool{}
	for i, p := range in {
		if p.Limit < 1 {
			return nil, fmt.Errorf("%w: policy %d: Limit must be at least 1, got %d", ErrInvalidLimiterConfig, i, p.Limit)
		}
		if p.Window < time.Millisecond {
			return nil, fmt.Errorf("%w: policy %d: Window must be at least 1ms, got %v", ErrInvalidLimiterConfig, i, p.Window)
		}
		if p.Algorithm > TokenBucket {
			return nil, fmt.Errorf("%w: policy %d: unknown Algorithm %d", ErrInvalidLimiterConfig, i, p.Algorithm)
		}
		if p.Burst < 0 {
			return nil, fmt.Errorf("%w: policy %d: negative Burst", ErrInvalidLimiterConfig, i)
		}
		if p.Algorithm != TokenBucket {
			p.Burst = 0
		} else if p.Burst == 0 {
			p.Burst = p.Limit
		}
		if p.Name == "" {
			p.Name = strconv.FormatInt(p.Limit, 10) + "-per-" + shortDuration(p.Window)
			if p.Algorithm != SlidingWindow {
				p.Name += "-" + p.Algorithm.String()
			}
		}
		for j := 0; j < len(p.Name); j++ {
			if c := p.Name[j]; c < 0x20 || c > 0x7e {
				return nil, fmt.Errorf("%w: policy %d: Name %q must be printable ASCII", ErrInvalidLimiterConfig, i, p.Name)
			}
		}
		kind := p.field()
		if names[p.Name] || kinds[kind] {
			return nil, fmt.Errorf("%w: policy %d (%s): two policies share a Name, or an Algorithm and a Window", ErrInvalidLimiterConfig, i, p.Name)
		}
		names[p.Name], kinds[kind] = true, true
		out[i] = p
	}
	return out, nil
}

// shortDuration is d.String() without zero units: "1m", "1h30m", "1.5s".
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// field is the stem of the hash fields (or the sorted set's key part) that
// hold p's state: its algorithm and window. Changing a policy's Limit keeps
// its state (a plan upgrade applies at once); changing its Window starts
// afresh.
func (p Policy) field() string {
	return strconv.Itoa(int(p.Algorithm)) + "." + strconv.FormatInt(p.Window.Microseconds(), 10)
}

// Policies returns the limiter's policies, defaults filled in.
func (l *Limiter) Policies() []Policy { return append([]Policy(nil), l.policies...) }

// keys returns the Redis keys of key under pols: the hash, then one sorted
// set per SlidingLog policy, all under one hash tag.
func (l *Limiter) keys(key string, pols []Policy) []string {
	if len(key) > 128 {
		key = "#" + Digest(key)
	}
	g := l.b.keys.Group("rl", l.name, key)
	keys := []string{g.Key()}
	for _, p := range pols {
		if p.Algorithm == SlidingLog {
			keys = append(keys, g.Key("log", p.field()))
		}
	}
	return keys
}

// Allow checks one request (cost 1) for key under the limiter's policies.
func (l *Limiter) Allow(ctx context.Context, key string) (Decision, error) {
	return l.AllowN(ctx, key, 1)
}

// AllowN checks a request of cost n for key under the limiter's policies:
// it is admitted only if every policy has n units left, and then consumes n
// from each. n = 0 reads the state without consuming. It returns
// ErrCostTooHigh when n exceeds a policy's capacity, ErrLimiterUnavailable
// when Redis cannot decide and the FailurePolicy is FailClosed, and the
// context's error when ctx ends first.
func (l *Limiter) AllowN(ctx context.Context, key string, n int64) (Decision, error) {
	if l.freePath && n > 0 {
		if d, ok := l.blocks.get(key, n); ok {
			return d, nil
		}
	}
	d, err := l.decide(ctx, key, n, l.policies)
	if err == nil && l.freePath && !d.Allowed && !d.Degraded && n > 0 {
		l.blocks.put(key, d)
	}
	return d, err
}

// AllowPolicies is AllowN with policies chosen for this request (a plan's
// limits, say) instead of the limiter's. Policies with the same Algorithm
// and Window share their counters whatever their Limit, so a new limit
// applies at once. The free path never applies.
func (l *Limiter) AllowPolicies(ctx context.Context, key string, n int64, policies ...Policy) (Decision, error) {
	pols, err := normalizePolicies(policies)
	if err != nil {
		return Decision{}, err
	}
	return l.decide(ctx, key, n, pols)
}

func (l *Limiter) decide(ctx context.Context, key string, n int64, pols []Policy) (Decision, error) {
	if key == "" {
		return Decision{}, ErrInvalidLimiterKey
	}
	if len(pols) == 0 {
		return Decision{}, fmt.Errorf("%w: no policy", ErrInvalidLimiterConfig)
	}
	if n < 0 {
		return Decision{}, fmt.Errorf("%w: negative cost %d", ErrInvalidLimiterConfig, n)
	}
	for _, p := range pols {
		if n > p.capacity() {
			return Decision{}, fmt.Errorf("%w: cost %d, policy %s admits at most %d", ErrCostTooHigh, n, p.Name, p.capacity())
		}
	}
	keys := l.keys(key, pols)
	args := make([]string, 0, 2+4*len(pols))
	args = append(args, strconv.FormatInt(n, 10), strconv.Itoa(len(pols)))
	for _, p := range pols {
		args = append(args, strconv.Itoa(int(p.Algorithm)+1), strconv.FormatInt(p.Limit, 10),
			strconv.FormatInt(p.Window.Microseconds(), 10), strconv.FormatInt(p.Burst, 10))
	}
	res := l.b.Exec(ctx, limitScript, keys, args)
	d, err := parseDecision(res, pols, n)
	if err != nil {
		if ctx.Err() != nil {
			return Decision{}, ctx.Err()
		}
		return l.degrade(key, n, pols, err)
	}
	d.key = key
	return d, nil
}

// degrade applies the FailurePolicy to a request Redis could not decide.
func (l *Limiter) degrade(key string, n int64, pols []Policy, cause error) (Decision, error) {
	switch l.onError {
	case FailClosed:
		l.b.log.Error("rate limit: Redis unavailable, refusing requests (FailClosed)", cause)
		return Decision{}, fmt.Errorf("%w: %w", ErrLimiterUnavailable, cause)
	case LocalFallback:
		l.b.log.Error("rate limit: Redis unavailable, deciding locally (LocalFallback)", cause)
		return l.local.decide(key, n, pols), nil
	default:
		l.b.log.Error("rate limit: Redis unavailable, allowing requests (FailOpen)", cause)
		d := Decision{Allowed: true, Time: l.b.clock.Now(), Cost: n, Degraded: true, key: key}
		for _, p := range pols {
			d.Policies = append(d.Policies, PolicyDecision{Policy: p, Allowed: true, Remaining: p.Limit})
		}
		d.bind()
		return d, nil
	}
}

// bind fills the Decision's summary (Limit, Remaining, Reset, RetryAfter)
// from its binding policy.
func (d *Decision) bind() {
	best := -1
	for i, pd := range d.Policies {
		if best < 0 {
			best = i
			continue
		}
		b := d.Policies[best]
		if d.Allowed {
			// fewest left, relative to the limit, then the longest reset
			if pd.Remaining*b.Policy.Limit < b.Remaining*pd.Policy.Limit ||
				pd.Remaining*b.Policy.Limit == b.Remaining*pd.Policy.Limit && pd.Reset > b.Reset {
				best = i
			}
		} else if pd.RetryAfter > b.RetryAfter {
			best = i
		}
	}
	if best < 0 {
		return
	}
	b := d.Policies[best]
	d.Limit, d.Remaining, d.Reset = b.Policy.Limit, b.Remaining, b.Reset
	if !d.Allowed {
		d.RetryAfter = b.RetryAfter
	}
}

// parseDecision reads limitScript's reply.
func parseDecision(res rueidis.RedisResult, pols []Policy, n int64) (Decision, error) {
	arr, err := res.ToArray()
	if err != nil {
		return Decision{}, err
	}
	if len(arr) != 2+4*len(pols) {
		return Decision{}, fmt.Errorf("rate limit: unexpected reply of %d elements", len(arr))
	}
	allowed, err1 := arr[0].AsInt64()
	now, err2 := arr[1].AsInt64()
	if err := errors.Join(err1, err2); err != nil {
		return Decision{}, err
	}
	d := Decision{Allowed: allowed == 1, Time: time.UnixMicro(now), Cost: n, Policies: make([]PolicyDecision, len(pols)), tokens: make([]string, len(pols))}
	for i, p := range pols {
		v := arr[2+4*i : 6+4*i]
		rem, e1 := v[0].AsInt64()
		reset, e2 := v[1].AsInt64()
		retry, e3 := v[2].AsInt64()
		tok, e4 := v[3].ToString()
		if err := errors.Join(e1, e2, e3, e4); err != nil {
			return Decision{}, err
		}
		d.Policies[i] = PolicyDecision{Policy: p, Allowed: retry == 0, Remaining: rem,
			Reset: time.Duration(reset) * time.Microsecond, RetryAfter: time.Duration(retry) * time.Microsecond}
		d.tokens[i] = tok
	}
	d.bind()
	return d, nil
}

// Refund gives back the cost of an allowed decision, under each policy, as
// express-rate-limit's skipSuccessfulRequests does: a fixed window or a
// sliding-window counter only while the decision's window is still
// counted, a log entry if it is still there, a token bucket's tokens up to
// full. A denied or degraded decision consumed nothing in Redis, and
// refunds nothing. Refund also lifts this instance's free-path block of
// the key; other instances keep theirs (see DisableFreePath).
func (l *Limiter) Refund(ctx context.Context, d Decision) error {
	if !d.Allowed || d.Degraded || d.Cost == 0 || d.key == "" {
		return nil
	}
	pols := make([]Policy, len(d.Policies))
	args := make([]string, 0, 2+5*len(pols))
	args = append(args, strconv.FormatInt(d.Cost, 10), strconv.Itoa(len(pols)))
	for i, pd := range d.Policies {
		p := pd.Policy
		pols[i] = p
		args = append(args, strconv.Itoa(int(p.Algorithm)+1), strconv.FormatInt(p.Limit, 10),
			strconv.FormatInt(p.Window.Microseconds(), 10), strconv.FormatInt(p.Burst, 10), d.tokens[i])
	}
	l.blocks.delete(d.key)
	return l.b.Exec(ctx, refundScript, l.keys(d.key, pols), args).Error()
}

// Reset forgets key's counters under the limiter's policies, in Redis and
// in this instance's free path (other instances keep their blocks until
// they expire; see DisableFreePath).
func (l *Limiter) Reset(ctx context.Context, key string) error {
	if key == "" {
		return ErrInvalidLimiterKey
	}
	l.blocks.delete(key)
	keys := l.keys(key, l.policies)
	return l.b.Do(ctx, keys[0], l.b.client.B().Del().Key(keys...).Build()).Error()
}

// limitScript decides one request under several policies, atomically.
//
// KEYS[1]    the key's hash: every policy's counters except SlidingLog's
// KEYS[2..]  one sorted set per SlidingLog policy, in policy order
// ARGV[1]    cost (0 reads without consuming)
// ARGV[2]    number of policies, then 4 per policy:
//
//	algorithm (1 sliding counter, 2 fixed, 3 log, 4 GCRA), limit,
//	window (µs), burst (GCRA)
//
// Times are microseconds of Redis TIME. Hash fields are named by algorithm
// and window ("<alg>.<window>:<x>"), never by time. Phase one computes every
// policy's verdict without writing; only if all admit does phase two write
// (so a denial consumes nothing) and extend the keys' TTLs to what their
// state needs.
//
// Reply: allowed (0/1), now, then per policy: remaining, reset (µs until
// whole again), retry (µs until this cost would pass; 0 when it passes),
// refund token (string).
var limitScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local np = tonumber(ARGV[2])
local hash = KEYS[1]
local function fmt(x) return string.format('%.0f', x) end

local pol, fields = {}, {}
for i = 1, np do
  local b = 3 + (i - 1) * 4
  local p = {alg = tonumber(ARGV[b]), limit = tonumber(ARGV[b + 1]), win = tonumber(ARGV[b + 2]), burst = tonumber(ARGV[b + 3])}
  p.f = (p.alg - 1) .. '.' .. ARGV[b + 2] .. ':'
  p.at = #fields + 1
  if p.alg == 1 then
    fields[#fields + 1] = p.f .. 'w'; fields[#fields + 1] = p.f .. 'c'; fields[#fields + 1] = p.f .. 'p'
  elseif p.alg == 2 then
    fields[#fields + 1] = p.f .. 's'; fields[#fields + 1] = p.f .. 'n'
  elseif p.alg == 4 then
    fields[#fields + 1] = p.f .. 't'
  end
  pol[i] = p
end
local vals = {}
if #fields > 0 then vals = redis.call('HMGET', hash, unpack(fields)) end
local function val(i) return tonumber(vals[i]) end

local allowed, logk = 1, 1
for i = 1, np do
  local p = pol[i]
  local limit, win = p.limit, p.win
  if p.alg == 1 then
    local idx = math.floor(now / win)
    local sidx, cur, prev = val(p.at), val(p.at + 1) or 0, val(p.at + 2) or 0
    if sidx ~= idx then
      if sidx == idx - 1 then prev = cur else prev = 0 end
      cur = 0
    end
    local elapsed = now - idx * win
    local est = prev * (win - elapsed) / win + cur
    p.idx, p.cur, p.prev = idx, cur, prev
    if est + cost <= limit then
      p.ok = true
      p.rem = math.floor(limit - est - cost)
      p.retry = 0
      if cost > 0 then p.cur = cur + cost end
    else
      p.rem = math.max(0, math.floor(limit - est))
      local room = limit - cur - cost
      local wait = -1
      if room >= 0 and prev > 0 then
        local e = win - room * win / prev
        if e < win then wait = math.max(1, math.ceil(e - elapsed) + 1) end
      end
      if wait < 0 then
        local e = 0
        if cur > 0 then e = math.max(0, win - (limit - cost) * win / cur) end
        wait = math.ceil((idx + 1) * win - now + e) + 1
      end
      p.retry = wait
    end
    if p.cur > 0 then p.reset = (idx + 2) * win - now
    elseif p.prev > 0 then p.reset = (idx + 1) * win - now
    else p.reset = 0 end
    p.ttl = (idx + 2) * win - now
    p.tok = fmt(idx)
  elseif p.alg == 2 then
    local start, n = val(p.at), val(p.at + 1) or 0
    if not start or now >= start + win then start, n = now, 0 end
    p.start = start
    if n + cost <= limit then
      p.ok = true; p.n = n + cost; p.rem = limit - n - cost; p.retry = 0
    else
      p.n = n; p.rem = limit - n; p.retry = start + win - now
    end
    if p.n > 0 then p.reset = start + win - now else p.reset = 0 end
    p.ttl = start + win - now
    p.tok = fmt(start)
  elseif p.alg == 3 then
    logk = logk + 1
    p.key = KEYS[logk]
    redis.call('ZREMRANGEBYSCORE', p.key, '-inf', fmt(now - win))
    local count = redis.call('ZCARD', p.key)
    p.count = count
    if count + cost <= limit then
      p.ok = true; p.rem = limit - count - cost; p.retry = 0
    else
      p.rem = limit - count
      local k = count + cost - limit
      local e = redis.call('ZRANGE', p.key, k - 1, k - 1, 'WITHSCORES')
      p.retry = math.max(1, tonumber(e[2]) + win - now)
    end
    local last = redis.call('ZRANGE', p.key, -1, -1, 'WITHSCORES')
    local newest = 0
    if last[2] then newest = tonumber(last[2]) end
    if p.ok and cost > 0 then newest = now end
    if newest > 0 then p.reset = newest + win - now else p.reset = 0 end
    p.tok = ''
  else
    local burst = p.burst
    local T = win / limit
    local tat = val(p.at) or now
    if tat < now then tat = now end
    local newtat = tat + cost * T
    local allowAt = newtat - burst * T
    if now >= allowAt then
      p.ok = true; p.tat = newtat
      p.rem = math.floor((now - allowAt) / T + 1e-9)
      p.retry = 0
    else
      p.tat = tat
      p.rem = math.max(0, math.floor((now - (tat - burst * T)) / T + 1e-9))
      p.retry = math.ceil(allowAt - now)
    end
    p.reset = math.ceil(p.tat - now)
    p.ttl = p.reset
    p.tok = ''
  end
  if not p.ok then allowed = 0 end
end

if allowed == 1 and cost > 0 then
  local set, ttl = {}, 0
  for i = 1, np do
    local p = pol[i]
    if p.alg == 1 then
      set[#set + 1] = p.f .. 'w'; set[#set + 1] = fmt(p.idx)
      set[#set + 1] = p.f .. 'c'; set[#set + 1] = fmt(p.cur)
      set[#set + 1] = p.f .. 'p'; set[#set + 1] = fmt(p.prev)
    elseif p.alg == 2 then
      set[#set + 1] = p.f .. 's'; set[#set + 1] = fmt(p.start)
      set[#set + 1] = p.f .. 'n'; set[#set + 1] = fmt(p.n)
    elseif p.alg == 4 then
      set[#set + 1] = p.f .. 't'; set[#set + 1] = fmt(math.floor(p.tat + 0.5))
    end
    if p.alg == 3 then
      -- Members are integers (compact in a listpack): now, or the next
      -- free integer after it when requests share a microsecond.
      local members, m = {}, now
      for j = 1, cost do
        while redis.call('ZSCORE', p.key, fmt(m)) do m = m + 1 end
        redis.call('ZADD', p.key, now, fmt(m))
        members[#members + 1] = fmt(m)
        m = m + 1
      end
      p.tok = table.concat(members, ' ')
      redis.call('PEXPIRE', p.key, math.ceil(p.win / 1000) + 1)
    elseif p.ttl > ttl then
      ttl = p.ttl
    end
  end
  if #set > 0 then
    redis.call('HSET', hash, unpack(set))
    redis.call('PEXPIRE', hash, math.ceil(ttl / 1000) + 1)
  end
end

local out = {allowed, now}
for i = 1, np do
  local p = pol[i]
  out[#out + 1] = math.max(0, p.rem)
  out[#out + 1] = math.max(0, math.ceil(p.reset))
  out[#out + 1] = p.retry
  out[#out + 1] = p.tok
end
return out
`)

// refundScript gives back a decision's cost.
//
// KEYS    as limitScript's
// ARGV[1] cost
// ARGV[2] number of policies, then 5 per policy: algorithm, limit, window
// (µs), burst, and the decision's refund token (the sliding counter's
// window index, the fixed window's start, the log's members).
var refundScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local np = tonumber(ARGV[2])
local hash = KEYS[1]
local logk = 1
local function fmt(x) return string.format('%.0f', x) end
for i = 1, np do
  local b = 3 + (i - 1) * 5
  local alg, limit, win, tok = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), ARGV[b + 4]
  local f = (alg - 1) .. '.' .. ARGV[b + 2] .. ':'
  if alg == 1 then
    local v = redis.call('HMGET', hash, f .. 'w', f .. 'c', f .. 'p')
    local idx, at = tonumber(v[1]), tonumber(tok)
    if idx and at then
      if idx == at then
        redis.call('HSET', hash, f .. 'c', fmt(math.max(0, (tonumber(v[2]) or 0) - cost)))
      elseif idx == at + 1 then
        redis.call('HSET', hash, f .. 'p', fmt(math.max(0, (tonumber(v[3]) or 0) - cost)))
      end
    end
  elseif alg == 2 then
    local v = redis.call('HMGET', hash, f .. 's', f .. 'n')
    if v[1] and v[1] == tok and now < tonumber(v[1]) + win then
      redis.call('HSET', hash, f .. 'n', fmt(math.max(0, (tonumber(v[2]) or 0) - cost)))
    end
  elseif alg == 3 then
    logk = logk + 1
    for m in string.gmatch(tok, '%S+') do redis.call('ZREM', KEYS[logk], m) end
  else
    local tat = tonumber(redis.call('HGET', hash, f .. 't'))
    if tat then
      tat = tat - cost * win / limit
      if tat <= now then redis.call('HDEL', hash, f .. 't')
      else redis.call('HSET', hash, f .. 't', fmt(math.floor(tat + 0.5))) end
    end
  end
end
return 1
`)

// blockMap is the free path: keys denied until a known time, with the
// decision that denied them. Lookups take no lock.
type blockMap struct {
	clock Clock
	m     sync.Map // key -> *block
	n     atomic.Int64
	sweep atomic.Int64 // unix nanos of the next sweep
}

type block struct {
	d     Decision
	at    time.Time // local time of the denial
	until time.Time // local time the denial ends
}

// maxBlocks bounds the free path's map; beyond it, new blocks are not
// remembered until a sweep frees room (requests then go to Redis).
const maxBlocks = 100_000

func (m *blockMap) get(key string, cost int64) (Decision, bool) {
	v, ok := m.m.Load(key)
	if !ok {
		return Decision{}, false
	}
	b := v.(*block)
	now := m.clock.Now()
	if !now.Before(b.until) {
		if m.m.CompareAndDelete(key, v) {
			m.n.Add(-1)
		}
		return Decision{}, false
	}
	if cost < b.d.Cost {
		return Decision{}, false
	}
	// Rebase the denial's durations on the time that passed since.
	d := b.d
	d.Policies = append([]PolicyDecision(nil), b.d.Policies...)
	passed := now.Sub(b.at)
	for i := range d.Policies {
		pd := &d.Policies[i]
		pd.Reset = max(0, pd.Reset-passed)
		pd.RetryAfter = max(0, pd.RetryAfter-passed)
		pd.Allowed = pd.RetryAfter == 0
	}
	d.bind()
	d.RetryAfter = b.until.Sub(now)
	d.Time, d.Cost, d.FromMemory, d.tokens = now, cost, true, nil
	return d, true
}

func (m *blockMap) put(key string, d Decision) {
	if d.RetryAfter <= 0 {
		return
	}
	now := m.clock.Now()
	if now.UnixNano() >= m.sweep.Load() || m.n.Load() >= maxBlocks {
		m.sweepExpired(now)
	}
	if m.n.Load() >= maxBlocks {
		return
	}
	b := &block{d: d, at: now, until: now.Add(d.RetryAfter)}
	b.d.tokens = nil
	if _, loaded := m.m.Swap(key, b); !loaded {
		m.n.Add(1)
	}
}

func (m *blockMap) delete(key string) {
	if _, ok := m.m.LoadAndDelete(key); ok {
		m.n.Add(-1)
	}
}

// sweepExpired drops ended blocks, at most once a second.
func (m *blockMap) sweepExpired(now time.Time) {
	next := m.sweep.Load()
	if now.UnixNano() < next && m.n.Load() < maxBlocks {
		return
	}
	if !m.sweep.CompareAndSwap(next, now.Add(time.Second).UnixNano()) {
		return
	}
	m.m.Range(func(k, v any) bool {
		if !now.Before(v.(*block).until) && m.m.CompareAndDelete(k, v) {
			m.n.Add(-1)
		}
		return true
	})
}

// localLimiter is LocalFallback's in-process limiter: the same algorithms
// on the local clock, every Limit and Burst scaled by share.
type localLimiter struct {
	clock Clock
	share float64

	mu    sync.Mutex
	keys  map[string]*localKey
	sweep time.Time
}

// localKey is one key's state, by policy field.
type localKey struct {
	st      map[string]*localState
	expires time.Time
}

// localState holds one policy's counters: a (window index or start),
// c (count), p (previous count), tat (GCRA) and the log.
type localState struct {
	a, c, p, tat float64
	log          []float64
}

// maxLocalKeys bounds the fallback's memory; beyond it, expired keys are
// swept, and if none expired the oldest state is dropped wholesale.
const maxLocalKeys = 100_000

func (ll *localLimiter) decide(key string, n int64, pols []Policy) Decision {
	now := ll.clock.Now()
	us := float64(now.UnixMicro())
	ll.mu.Lock()
	defer ll.mu.Unlock()
	if len(ll.keys) >= maxLocalKeys || now.After(ll.sweep) {
		for k, v := range ll.keys {
			if now.After(v.expires) {
				delete(ll.keys, k)
			}
		}
		if len(ll.keys) >= maxLocalKeys {
			ll.keys = map[string]*localKey{}
		}
		ll.sweep = now.Add(time.Second)
	}
	lk := ll.keys[key]
	if lk == nil {
		lk = &localKey{st: map[string]*localState{}}
		ll.keys[key] = lk
	}
	d := Decision{Allowed: true, Time: now, Cost: n, Degraded: true, key: key, Policies: make([]PolicyDecision, len(pols))}
	next := make([]localState, len(pols))
	cost := float64(n)
	for i, p := range pols {
		st := lk.st[p.field()]
		if st == nil {
			st = &localState{}
			lk.st[p.field()] = st
		}
		s := *st
		s.log = append([]float64(nil), st.log...)
		limit := math.Max(1, math.Floor(float64(p.Limit)*ll.share))
		win := float64(p.Window.Microseconds())
		var ok bool
		var rem, reset, retry float64
		switch p.Algorithm {
		case SlidingWindow:
			idx := math.Floor(us / win)
			if s.a != idx {
				if s.a == idx-1 {
					s.p = s.c
				} else {
					s.p = 0
				}
				s.a, s.c = idx, 0
			}
			elapsed := us - idx*win
			est := s.p*(win-elapsed)/win + s.c
			ok = est+cost <= limit
			if ok {
				s.c += cost
				rem = limit - est - cost
			} else {
				rem = limit - est
				retry = (idx+1)*win - us // conservative: the next window
			}
			reset = (idx+2)*win - us
		case FixedWindow:
			if s.c == 0 && s.a == 0 || us >= s.a+win {
				s.a, s.c = us, 0
			}
			ok = s.c+cost <= limit
			if ok {
				s.c += cost
			} else {
				retry = s.a + win - us
			}
			rem, reset = limit-s.c, s.a+win-us
		case SlidingLog:
			kept := s.log[:0]
			for _, ts := range s.log {
				if ts > us-win {
					kept = append(kept, ts)
				}
			}
			s.log = kept
			ok = float64(len(s.log))+cost <= limit
			if ok {
				for range n {
					s.log = append(s.log, us)
				}
				rem = limit - float64(len(s.log))
			} else {
				rem = limit - float64(len(s.log))
				k := int(float64(len(s.log)) + cost - limit)
				retry = s.log[k-1] + win - us
			}
			reset = win
		case TokenBucket:
			burst := math.Max(1, math.Floor(float64(p.Burst)*ll.share))
			T := win / limit
			tat := math.Max(s.tat, us)
			allowAt := tat + cost*T - burst*T
			ok = us >= allowAt
			if ok {
				s.tat = tat + cost*T
				rem = math.Floor((us - allowAt) / T)
			} else {
				retry = allowAt - us
				rem = math.Floor((us - (tat - burst*T)) / T)
			}
			reset = math.Max(s.tat, us) - us
		}
		next[i] = s
		d.Policies[i] = PolicyDecision{Policy: p, Allowed: ok, Remaining: int64(math.Max(0, rem)),
			Reset: time.Duration(math.Ceil(math.Max(0, reset))) * time.Microsecond, RetryAfter: time.Duration(math.Ceil(math.Max(0, retry))) * time.Microsecond}
		d.Policies[i].Policy.Limit = int64(limit)
		if !ok {
			d.Allowed = false
		}
	}
	if d.Allowed && n > 0 {
		longest := time.Duration(0)
		for i, p := range pols {
			*lk.st[p.field()] = next[i]
			longest = max(longest, 2*p.Window)
		}
		lk.expires = now.Add(longest)
	}
	d.bind()
	return d
}

// RateLimitConfig configures the rate limit middleware.
type RateLimitConfig struct {
	// Limiter decides. Default: a Limiter built from Client, Options, Name,
	// Policies, OnRedisError and FallbackShare, with the free path on
	// unless Cost, PolicyFunc, SkipSuccessfulRequests or
	// SkipFailedRequests is set.
	Limiter *Limiter
	// Client is the rueidis client; required when Limiter is nil.
	Client rueidis.Client
	// Options is the shared plumbing, used when Limiter is nil.
	Options
	// Name separates this middleware's counters from other limiters'
	// (LimiterConfig.Name). Give each differently configured middleware
	// its own. Default: "default".
	Name string
	// Policies are the limits, decided together (LimiterConfig.Policies).
	// Default: 100 requests per minute, sliding window (the guide's API
	// limiter).
	Policies []Policy
	// PolicyFunc, when set, returns the policies of a request (a plan's
	// limits), used instead of Policies. It turns the free path off.
	// Default: nil.
	PolicyFunc func(c echo.Context) []Policy
	// OnRedisError is the FailurePolicy (LimiterConfig.OnRedisError).
	// Default: FailOpen.
	OnRedisError FailurePolicy
	// FallbackShare is each instance's share under LocalFallback
	// (LimiterConfig.FallbackShare).
	FallbackShare float64

	// KeyFunc returns the key a request is counted under. An error is
	// answered with 400 (or the error itself when it is an
	// *echo.HTTPError). Default: IPKey(DefaultIPv6Prefix).
	KeyFunc func(c echo.Context) (string, error)
	// Cost returns a request's cost in units. It turns the free path off.
	// Default: 1 for every request.
	Cost func(c echo.Context) int64
	// Skipper skips the middleware for a request. Default: never skip.
	Skipper middleware.Skipper

	// SkipSuccessfulRequests refunds requests that succeeded, so only
	// failures count (the guide's login limiter). It turns the free path
	// off. Default: false.
	SkipSuccessfulRequests bool
	// SkipFailedRequests refunds requests that failed. It turns the free
	// path off. Default: false.
	SkipFailedRequests bool
	// RequestWasSuccessful tells success from failure for the two options
	// above; err is the handler's error. Default: a status below 400.
	RequestWasSuccessful func(c echo.Context, err error) bool

	// Message is the JSON body of a 429. Default:
	// {"error": "Too many requests, please try again later."}.
	Message any
	// DeniedHandler, when set, answers denied requests instead of the 429
	// with Message. The rate limit headers are already set. Default: nil.
	DeniedHandler func(c echo.Context, d Decision) error
	// UnavailableMessage is the JSON body of the 503 a FailClosed limiter
	// answers while Redis cannot decide. Default:
	// {"error": "Service temporarily unavailable, please try again later."}.
	UnavailableMessage any

	// DisableDraftHeaders leaves out the RateLimit-Policy and RateLimit
	// fields of draft-ietf-httpapi-ratelimit-headers-11. Default: false
	// (sent).
	DisableDraftHeaders bool
	// DisableLegacyHeaders leaves out X-RateLimit-Limit,
	// X-RateLimit-Remaining and X-RateLimit-Reset (Unix seconds, as GitHub
	// and express-rate-limit send it) of the binding policy. Default: false
	// (sent).
	DisableLegacyHeaders bool
	// DisableRetryAfter leaves out Retry-After on 429s. Default: false
	// (sent).
	DisableRetryAfter bool
}

// DefaultIPv6Prefix is the prefix length IPKey groups IPv6 clients by: a
// /64 is what one subscriber usually gets, so counting addresses one by one
// would let a client rotate through 2^64 of them.
const DefaultIPv6Prefix = 64

// DefaultRateLimitMessage is the body of a 429, as in the guide.
var DefaultRateLimitMessage = map[string]string{"error": "Too many requests, please try again later."}

// DefaultRateLimitUnavailableMessage is the body of a FailClosed 503.
var DefaultRateLimitUnavailableMessage = map[string]string{"error": "Service temporarily unavailable, please try again later."}

// RateLimit returns the rate limit middleware for client: every request
// counted under its client IP (IPKey) by policies, 100 per minute when none
// are given, with the defaults of RateLimitConfig. It panics when client is
// nil or a policy is invalid. Put it before Cache, so that cache hits count
// too.
func RateLimit(client rueidis.Client, policies ...Policy) echo.MiddlewareFunc {
	return RateLimitWithConfig(RateLimitConfig{Client: client, Policies: policies})
}

// RateLimitWithConfig returns the rate limit middleware for cfg. It panics
// when cfg is invalid; use ToMiddleware to get the error instead.
func RateLimitWithConfig(cfg RateLimitConfig) echo.MiddlewareFunc {
	return must(cfg.ToMiddleware())
}

// IPKey returns a KeyFunc counting requests by client address, from Echo's
// RealIP: the connection's peer unless the Echo instance has an
// IPExtractor, which must be set behind a proxy (see the README).
// IPv4 addresses (and IPv4-mapped IPv6) count one by one; IPv6 addresses
// are grouped by their first v6Prefix bits (0 < v6Prefix <= 128; 128 counts
// each address alone).
func IPKey(v6Prefix int) func(c echo.Context) (string, error) {
	if v6Prefix <= 0 || v6Prefix > 128 {
		v6Prefix = DefaultIPv6Prefix
	}
	return func(c echo.Context) (string, error) {
		return clientIP(c.RealIP(), v6Prefix), nil
	}
}

// clientIP returns the key of an address: the IPv4 address, or the IPv6
// prefix of v6Prefix bits. Anything unparsable is kept as is (the key
// escaping makes it safe).
func clientIP(ip string, v6Prefix int) string {
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return ip
	}
	addr = addr.Unmap().WithZone("")
	if addr.Is4() || v6Prefix >= 128 {
		return addr.String()
	}
	p, err := addr.Prefix(v6Prefix)
	if err != nil {
		return addr.String()
	}
	return p.String()
}

// UserOrIPKey returns a KeyFunc counting signed-in users by their ID and
// anonymous clients by address, the guide's `req.user?.id || req.ip`: user
// returns the ID of the request's user, or "" when anonymous. The two
// kinds never collide ("user:" and "ip:" prefixes).
func UserOrIPKey(user func(c echo.Context) string, v6Prefix int) func(c echo.Context) (string, error) {
	ipKey := IPKey(v6Prefix)
	return func(c echo.Context) (string, error) {
		if id := user(c); id != "" {
			return "user:" + id, nil
		}
		ip, err := ipKey(c)
		return "ip:" + ip, err
	}
}

// rateLimit is the middleware's state.
type rateLimit struct {
	l   *Limiter
	cfg RateLimitConfig
}

// ToMiddleware validates cfg, fills its defaults and returns the
// middleware. It does no I/O.
func (cfg RateLimitConfig) ToMiddleware() (echo.MiddlewareFunc, error) {
	refunds := cfg.SkipSuccessfulRequests || cfg.SkipFailedRequests
	if cfg.Limiter == nil {
		if len(cfg.Policies) == 0 && cfg.PolicyFunc == nil {
			cfg.Policies = []Policy{PerMinute(100)}
		}
		l, err := NewLimiter(LimiterConfig{
			Client: cfg.Client, Options: cfg.Options, Name: cfg.Name, Policies: cfg.Policies,
			OnRedisError: cfg.OnRedisError, FallbackShare: cfg.FallbackShare,
			DisableFreePath: refunds || cfg.Cost != nil || cfg.PolicyFunc != nil,
		})
		if err != nil {
			return nil, err
		}
		cfg.Limiter = l
	} else if refunds && cfg.Limiter.freePath {
		return nil, fmt.Errorf("%w: SkipSuccessfulRequests and SkipFailedRequests refund, which the free path cannot see: give a Limiter with DisableFreePath", ErrInvalidLimiterConfig)
	}
	if len(cfg.Limiter.policies) == 0 && cfg.PolicyFunc == nil {
		return nil, fmt.Errorf("%w: no policy", ErrInvalidLimiterConfig)
	}
	if cfg.KeyFunc == nil {
		cfg.KeyFunc = IPKey(DefaultIPv6Prefix)
	}
	if cfg.Skipper == nil {
		cfg.Skipper = middleware.DefaultSkipper
	}
	if cfg.RequestWasSuccessful == nil {
		cfg.RequestWasSuccessful = statusBelow400
	}
	if cfg.Message == nil {
		cfg.Message = DefaultRateLimitMessage
	}
	if cfg.UnavailableMessage == nil {
		cfg.UnavailableMessage = DefaultRateLimitUnavailableMessage
	}
	rl := &rateLimit{l: cfg.Limiter, cfg: cfg}
	return rl.middleware, nil
}

// statusBelow400 is the default RequestWasSuccessful.
func statusBelow400(c echo.Context, err error) bool {
	return responseStatus(c, err) < 400
}

// responseStatus is the status a request ends with: the handler's error's
// when it returned one and wrote nothing, the response's otherwise.
func responseStatus(c echo.Context, err error) int {
	if err != nil && !c.Response().Committed {
		var he *echo.HTTPError
		if errors.As(err, &he) {
			return he.Code
		}
		return http.StatusInternalServerError
	}
	return c.Response().Status
}

func (rl *rateLimit) middleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if rl.cfg.Skipper(c) {
			return next(c)
		}
		key, err := rl.cfg.KeyFunc(c)
		if err != nil {
			var he *echo.HTTPError
			if errors.As(err, &he) {
				return err
			}
			rl.l.b.log.Error("rate limit: key function failed", err)
			return echo.NewHTTPError(http.StatusBadRequest, "request cannot be rate limited")
		}
		if key == "" {
			return echo.NewHTTPError(http.StatusBadRequest, "request cannot be rate limited")
		}
		cost := int64(1)
		if rl.cfg.Cost != nil {
			cost = rl.cfg.Cost(c)
		}
		ctx := c.Request().Context()
		var d Decision
		if rl.cfg.PolicyFunc != nil {
			d, err = rl.l.AllowPolicies(ctx, key, cost, rl.cfg.PolicyFunc(c)...)
		} else {
			d, err = rl.l.AllowN(ctx, key, cost)
		}
		switch {
		case err == nil:
		case errors.Is(err, ErrLimiterUnavailable):
			return c.JSON(http.StatusServiceUnavailable, rl.cfg.UnavailableMessage)
		case errors.Is(err, ErrCostTooHigh):
			return c.JSON(http.StatusTooManyRequests, rl.cfg.Message)
		case ctx.Err() != nil:
			return err // the client went away
		default:
			rl.l.b.log.Error("rate limit: cannot decide", err)
			return echo.NewHTTPError(http.StatusInternalServerError)
		}
		rl.setHeaders(c.Response().Header(), d)
		if !d.Allowed {
			if rl.cfg.DeniedHandler != nil {
				return rl.cfg.DeniedHandler(c, d)
			}
			return c.JSON(http.StatusTooManyRequests, rl.cfg.Message)
		}
		err = next(c)
		if rl.cfg.SkipSuccessfulRequests || rl.cfg.SkipFailedRequests {
			ok := rl.cfg.RequestWasSuccessful(c, err)
			if ok && rl.cfg.SkipSuccessfulRequests || !ok && rl.cfg.SkipFailedRequests {
				if rerr := rl.l.Refund(context.WithoutCancel(ctx), d); rerr != nil {
					rl.l.b.log.Error("rate limit: refund failed", rerr)
				}
			}
		}
		return err
	}
}

// setHeaders writes the decision's headers: the draft's RateLimit-Policy
// and RateLimit (draft-ietf-httpapi-ratelimit-headers-11, one list member
// per policy), the legacy X-RateLimit-* of the binding policy, and
// Retry-After when denied.
func (rl *rateLimit) setHeaders(h http.Header, d Decision) {
	retry := seconds(d.RetryAfter)
	if !rl.cfg.DisableDraftHeaders && len(d.Policies) > 0 {
		var pol, cur []byte
		for i, pd := range d.Policies {
			if i > 0 {
				pol = append(pol, ", "...)
				cur = append(cur, ", "...)
			}
			pol = appendSFString(pol, pd.Policy.Name)
			pol = append(pol, ";q="...)
			pol = strconv.AppendInt(pol, pd.Policy.Limit, 10)
			pol = append(pol, ";w="...)
			pol = strconv.AppendInt(pol, max(1, seconds(pd.Policy.Window)), 10)
			cur = appendSFString(cur, pd.Policy.Name)
			cur = append(cur, ";r="...)
			cur = strconv.AppendInt(cur, pd.Remaining, 10)
			t := seconds(pd.Reset)
			if !d.Allowed {
				// -11 §6: Retry-After must not end before the effective
				// window does.
				t = min(t, retry)
			}
			cur = append(cur, ";t="...)
			cur = strconv.AppendInt(cur, t, 10)
		}
		h.Set("RateLimit-Policy", string(pol))
		h.Set("RateLimit", string(cur))
	}
	if !rl.cfg.DisableLegacyHeaders {
		h.Set("X-RateLimit-Limit", strconv.FormatInt(d.Limit, 10))
		h.Set("X-RateLimit-Remaining", strconv.FormatInt(d.Remaining, 10))
		h.Set("X-RateLimit-Reset", strconv.FormatInt(rl.l.b.clock.Now().Add(d.Reset).Add(time.Second-1).Unix(), 10))
	}
	if !d.Allowed && !rl.cfg.DisableRetryAfter {
		h.Set(echo.HeaderRetryAfter, strconv.FormatInt(max(1, retry), 10))
	}
}

// seconds rounds d up to whole seconds.
func seconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

// appendSFString appends s as an RFC 9651 String (printable ASCII, checked
// by normalizePolicies; '"' and '\' escaped).
func appendSFString(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b = append(b, '\\')
		}
		b = append(b, s[i])
	}
	return append(b, '"')
}
