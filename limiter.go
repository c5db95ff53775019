package redisecho

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"runtime"
	"sort"
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

// PerSecond returns a SlidingWindow policy of limit requests per second.
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
// failed, timed out, came too late, or the circuit breaker is open; or an
// admission needed a write that a full Redis (maxmemory) refused.
//
// Whatever the policy, such a request is charged nothing in Redis. rueidis
// keeps a timed-out command queued, so a paused Redis runs it when it
// resumes; every script therefore carries a deadline in the Redis time of
// its node (the caller's deadline or the Limiter's Timeout, learnt from
// the TIME every reply carries), reads TIME first, and past the deadline
// changes nothing. One gap remains: a script that ran in time but whose
// reply was lost, or arrived after the deadline (a connection cut just
// after it ran), stays charged while the caller applied its policy.
type FailurePolicy uint8

const (
	// FailOpen allows the request and logs the error (at most once per
	// second). It is the default, as in the guide's limiters: an outage of
	// the limiter does not become an outage of the site. It leaves nothing
	// behind: no charge in Redis, no state in memory.
	FailOpen FailurePolicy = iota
	// FailClosed refuses the request: Allow returns ErrLimiterUnavailable,
	// which the middleware answers with 503, not 429. It leaves nothing
	// behind: no charge in Redis, no state in memory.
	FailClosed
	// LocalFallback decides in process memory, with each policy's Limit
	// (and Burst) scaled by FallbackShare, so that N instances together
	// stay near the global limit instead of granting N times it. It leaves
	// no charge in Redis: once Redis answers, decisions come from Redis's
	// state alone, so a request is never counted both locally and in
	// Redis. In memory it keeps the counters of the requests it admitted
	// (at most 100,000 keys, each dropped once its windows are over), used
	// again only if Redis fails again within those windows.
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
	// Policy or RateLimitConfig, and for two limiters on one client,
	// prefix and Name with different policies (they would share counters).
	ErrInvalidLimiterConfig = errors.New("redisecho: rate limit: invalid configuration")
	// ErrInvalidLimiterKey is returned by Allow for an empty key.
	ErrInvalidLimiterKey = errors.New("redisecho: rate limit: empty key")
	// ErrCostTooHigh is returned by AllowN for a cost that a policy could
	// never admit (above its Limit, or its Burst for TokenBucket).
	ErrCostTooHigh = errors.New("redisecho: rate limit: cost exceeds the policy's capacity")
	// ErrLimiterUnavailable is returned by a FailClosed limiter when Redis
	// cannot decide.
	ErrLimiterUnavailable = errors.New("redisecho: rate limit: Redis unavailable")
)

// Limits of the values a policy takes, so that the script's arithmetic
// (doubles, microseconds) stays exact.
const (
	// MaxSlidingLogLimit bounds a SlidingLog policy's Limit: the log holds
	// one sorted-set entry per admitted unit, so a larger limit costs
	// memory and script time per key. Use SlidingWindow beyond it.
	MaxSlidingLogLimit = 10_000
	// maxWindow is 2^50 µs, about 35 years: now + twice a window stays
	// below 2^53 µs, where doubles are exact.
	maxWindow = (1 << 50) * time.Microsecond
)

// Decision is the outcome of one rate-limit check. It is meaningful outside
// HTTP too (a job, a websocket message): Allowed says whether to go on,
// RetryAfter when to try again.
type Decision struct {
	// Allowed reports whether the request was admitted (and its cost
	// consumed under every policy). A denied request consumes nothing.
	Allowed bool
	// Limit, Remaining and Reset describe the binding policy: the one with
	// the smallest share of its capacity left when allowed, the one that
	// makes the request wait longest when denied. Limit is the policy's
	// capacity: its Limit, or its Burst for a TokenBucket.
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

	key    string       // the normalized key
	refund *refundState // what Refund needs; shared by copies of the Decision
	local  bool         // decided by the local fallback
}

// refundState is a decision's refund tokens (per policy: what Refund needs
// to undo the cost) and whether it was refunded.
type refundState struct {
	tokens []string
	done   atomic.Bool
}

// PolicyDecision is one policy's part of a Decision.
type PolicyDecision struct {
	// Policy is the policy, defaults filled in.
	Policy Policy
	// Allowed reports whether this policy alone would admit the request.
	Allowed bool
	// Remaining is the number of units left under the policy (after the
	// request, when it was allowed).
	Remaining int64
	// Reset is the time until the policy's quota is whole again.
	Reset time.Duration
	// RetryAfter, when this policy refuses, is the time until it would
	// admit the request.
	RetryAfter time.Duration
	// Next is the time until the policy has more than Remaining units:
	// within Next, the client can use no more than Remaining (the
	// "effective window" of the RateLimit header). With the quota whole,
	// it is the policy's window (its emission interval for a TokenBucket).
	Next time.Duration
}

// LimiterConfig configures a Limiter.
type LimiterConfig struct {
	// Client is the rueidis client. Required.
	Client rueidis.Client
	// Options is the shared plumbing (Prefix, Timeout, Breaker, Clock,
	// Logger, Observer). The Clock drives the free path and the local
	// fallback only; windows run on Redis TIME. The Observer receives one
	// ObsLimitDecision per decision (see LimiterStats for what counts as
	// one, and each Result and Path).
	Options
	// Name separates this limiter's counters from other limiters' on the
	// same key. Two live limiters on one client and prefix with the same
	// Name must have the same policies, in any order (NewLimiter refuses
	// otherwise; to change a limit at run time use AllowPolicies, or a new
	// Name). Limiters with the same Name and policies share counters, on
	// purpose or not. Default: "default".
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
	// LocalFallback; ignored otherwise. Default: 0.
	FallbackShare float64
	// DisableFreePath turns the free path off. With the free path, a key
	// denied until a known time is denied again from process memory until
	// then (at most a minute at a time), without a Redis call, for any cost
	// at least the denied one. That is exact only while nothing gives
	// units back: turn it off when you Refund, or Reset keys, on several
	// instances (each lifts only its own blocks). Default: false (on).
	DisableFreePath bool
}

// Limiter decides rate limits in Redis. Each decision is one Lua script in
// one round trip over the key's hash (and, with SlidingLog policies, its
// sorted set under the same hash tag), timed by Redis TIME, so every
// instance agrees whatever its clock. Each call carries a deadline in its
// node's Redis time, so a call that reaches Redis too late charges nothing
// (see FailurePolicy); the first call to each node costs one more round
// trip (TIME), to learn the offset of that node's clock. Create it with
// NewLimiter; it is safe for concurrent use.
type Limiter struct {
	b        *backend
	name     string
	policies []Policy
	args     []string // policyArgs(policies)
	onError  FailurePolicy
	freePath bool

	blocks blockMap
	local  *localLimiter
	clocks redisClocks
	counts [limitCounts]atomic.Int64 // decisions, by limitCount
}

// limiterNames remembers the policies of every live (client, prefix, Name),
// so that two limiters that would share counters with different policies
// are refused. Entries go when their last Limiter is garbage collected.
var (
	limiterNamesMu sync.Mutex
	limiterNames   = map[limiterName]*limiterNameEntry{}
)

type limiterName struct {
	client       rueidis.Client
	prefix, name string
}

type limiterNameEntry struct {
	sig  string // the policies, sorted
	live int    // limiters using it
}

// claimName registers l's name with its policies' signature, or fails when
// a live limiter has the name with other policies.
func claimName(l *Limiter, id limiterName, pols []Policy) error {
	sigs := make([]string, len(pols))
	for i, p := range pols {
		sigs[i] = fmt.Sprintf("%d/%d/%d/%d", p.Algorithm, p.Limit, p.Window, p.Burst)
	}
	sort.Strings(sigs)
	sig := strings.Join(sigs, ";")
	limiterNamesMu.Lock()
	defer limiterNamesMu.Unlock()
	e := limiterNames[id]
	if e != nil && e.sig != sig {
		return fmt.Errorf("%w: another limiter named %q on this client has other policies, and would share its counters: give each its own Name", ErrInvalidLimiterConfig, id.name)
	}
	if e == nil {
		e = &limiterNameEntry{sig: sig}
		limiterNames[id] = e
	}
	e.live++
	runtime.AddCleanup(l, func(id limiterName) {
		limiterNamesMu.Lock()
		defer limiterNamesMu.Unlock()
		if e := limiterNames[id]; e != nil {
			if e.live--; e.live == 0 {
				delete(limiterNames, id)
			}
		}
	}, id)
	return nil
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
		args:     policyArgs(pols),
		onError:  cfg.OnRedisError,
		freePath: !cfg.DisableFreePath,
	}
	if err := claimName(l, limiterName{client: cfg.Client, prefix: b.keys.Prefix(), name: cfg.Name}, pols); err != nil {
		return nil, err
	}
	l.blocks.clock = b.clock
	l.clocks.base, l.clocks.timeout = time.Now(), b.timeout
	if l.onError == LocalFallback {
		l.local = &localLimiter{clock: b.clock, share: cfg.FallbackShare, keys: map[string]*localKey{}}
	}
	return l, nil
}

// normalizePolicies validates policies and fills their defaults, in a copy.
func normalizePolicies(in []Policy) ([]Policy, error) {
	out := make([]Policy, len(in))
	for i, p := range in {
		if p.Limit < 1 {
			return nil, fmt.Errorf("%w: policy %d: Limit must be at least 1, got %d", ErrInvalidLimiterConfig, i, p.Limit)
		}
		if p.Window < time.Millisecond || p.Window > maxWindow {
			return nil, fmt.Errorf("%w: policy %d: Window must be between 1ms and %v, got %v", ErrInvalidLimiterConfig, i, maxWindow, p.Window)
		}
		if p.Algorithm > TokenBucket {
			return nil, fmt.Errorf("%w: policy %d: unknown Algorithm %d", ErrInvalidLimiterConfig, i, p.Algorithm)
		}
		if p.Burst < 0 {
			return nil, fmt.Errorf("%w: policy %d: negative Burst", ErrInvalidLimiterConfig, i)
		}
		switch p.Algorithm {
		case TokenBucket:
			if p.Burst == 0 {
				p.Burst = p.Limit
			}
			// The emission interval is at least 1 µs, the script's clock
			// resolution.
			if p.Window.Microseconds() < p.Limit {
				return nil, fmt.Errorf("%w: policy %d: a TokenBucket admits at most one request per microsecond", ErrInvalidLimiterConfig, i)
			}
			if float64(p.Burst)*float64(p.Window.Microseconds())/float64(p.Limit) > float64(maxWindow.Microseconds()) {
				return nil, fmt.Errorf("%w: policy %d: Burst × Window / Limit above %v", ErrInvalidLimiterConfig, i, maxWindow)
			}
		case SlidingLog:
			if p.Limit > MaxSlidingLogLimit {
				return nil, fmt.Errorf("%w: policy %d: a SlidingLog Limit above %d (use SlidingWindow)", ErrInvalidLimiterConfig, i, MaxSlidingLogLimit)
			}
			p.Burst = 0
		default:
			p.Burst = 0
		}
		if p.Limit > 1<<40 || p.Burst > 1<<40 {
			return nil, fmt.Errorf("%w: policy %d: Limit or Burst above 2^40", ErrInvalidLimiterConfig, i)
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
		for _, q := range out[:i] {
			if q.Name == p.Name || q.Algorithm == p.Algorithm && q.Window == p.Window {
				return nil, fmt.Errorf("%w: policy %d (%s): two policies share a Name, or an Algorithm and a Window", ErrInvalidLimiterConfig, i, p.Name)
			}
		}
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

// field is the stem of the hash fields that hold p's state: its algorithm
// and window. Changing a policy's Limit keeps its state (a plan upgrade
// applies at once); changing its Window starts afresh.
func (p Policy) field() string {
	return algCode[p.Algorithm] + "." + strconv.FormatInt(p.Window.Microseconds(), 10)
}

// Policies returns the limiter's policies, defaults filled in.
func (l *Limiter) Policies() []Policy { return append([]Policy(nil), l.policies...) }

// normKey returns the key a limiter stores: key itself, or, when longer
// than 128 bytes (or starting with the mark), a digest marked with a NUL
// byte, so that no key kept as is can equal it.
func normKey(key string) string {
	if len(key) > 128 || strings.HasPrefix(key, "\x00") {
		return "\x00" + Digest(key)
	}
	return key
}

// keys returns the Redis keys of a normalized key: its hash and its log
// (a sorted set, used by SlidingLog policies), under one hash tag. Both
// are always declared, so the script never names a key itself.
func (l *Limiter) keys(nkey string) []string {
	var g KeyGroup
	if strings.HasPrefix(nkey, "\x00") {
		g = l.b.keys.Group("rl", l.name, "#", nkey[1:])
	} else {
		g = l.b.keys.Group("rl", l.name, nkey)
	}
	h := g.Key()
	return []string{h, h + ":log"}
}

// LimiterStats counts a Limiter's decisions since it was created, over all
// its policies and those given to AllowPolicies. Every decision that Allow,
// AllowN or AllowPolicies takes counts once, in exactly one of Allowed,
// Denied and Degraded; a call that fails before deciding (a cost above a
// policy's capacity, an empty key, an invalid policy, the caller's
// cancelled context) counts nowhere. A read of cost 0 is a decision (an
// allowed one).
//
// With an Observer, each decision is also an ObsLimitDecision: Allowed and
// Denied ones with ResultAllowed or ResultDenied and PathRedis, PathLocal
// (FromMemory) or PathFallback (Fallback); Degraded ones with
// ResultDegraded and PathNone (no limiter decided: the FailurePolicy did).
// Its Name is the binding policy's Name (the one Decision.Limit and the
// X-RateLimit-* headers describe: for a denial, the policy that makes the
// request wait longest), or the first policy's when no policy binds (a
// Degraded decision).
type LimiterStats struct {
	// Allowed counts the decisions that admitted the request: taken by
	// Redis, or by LocalFallback while Redis could not decide.
	Allowed int64
	// Denied counts the decisions that refused the request (a 429): taken
	// by Redis, by the free path, or by LocalFallback while Redis could not
	// decide.
	Denied int64
	// Degraded counts the requests Redis could not decide (a failed, late
	// or timed-out call, an open breaker, a full Redis refusing an
	// admission) that the FailurePolicy settled without a limiter: FailOpen
	// admitted them, FailClosed refused them with ErrLimiterUnavailable (a
	// 503). LocalFallback's decisions count in Allowed or Denied instead,
	// and in Fallback.
	Degraded int64
	// FromMemory counts the denials, among Denied, that the free path took
	// in process memory without asking Redis (Decision.FromMemory).
	FromMemory int64
	// Fallback counts the decisions, among Allowed and Denied, that
	// LocalFallback took in process memory while Redis could not decide.
	Fallback int64
}

// Stats returns the limiter's decision counts since it was created. Each
// counter is read atomically but on its own, so under load the figures may
// be a few decisions apart. It does no I/O.
func (l *Limiter) Stats() LimiterStats {
	c := func(k limitCount) int64 { return l.counts[k].Load() }
	return LimiterStats{
		Allowed:    c(countRedisAllowed) + c(countFallbackAllowed),
		Denied:     c(countRedisDenied) + c(countMemoryDenied) + c(countFallbackDenied),
		Degraded:   c(countDegraded),
		FromMemory: c(countMemoryDenied),
		Fallback:   c(countFallbackAllowed) + c(countFallbackDenied),
	}
}

// limitCount is one of the limiter's disjoint decision counters: a Result
// and a Path of ObsLimitDecision. Stats sums them, so a decision costs one
// atomic add.
type limitCount uint8

const (
	countRedisAllowed limitCount = iota
	countRedisDenied
	countMemoryDenied
	countFallbackAllowed
	countFallbackDenied
	countDegraded
	limitCounts
)

// limitCountObs is each counter's Result and Path.
var limitCountObs = [limitCounts]struct {
	r Result
	p Path
}{
	countRedisAllowed:    {ResultAllowed, PathRedis},
	countRedisDenied:     {ResultDenied, PathRedis},
	countMemoryDenied:    {ResultDenied, PathLocal},
	countFallbackAllowed: {ResultAllowed, PathFallback},
	countFallbackDenied:  {ResultDenied, PathFallback},
	countDegraded:        {ResultDegraded, PathNone},
}

// verdict is allowed when d admitted its request, denied otherwise.
func verdict(d *Decision, allowed, denied limitCount) limitCount {
	if d.Allowed {
		return allowed
	}
	return denied
}

// counted counts one decision under c and reports it to the Observer
// (ObsLimitDecision), named after d's binding policy, or pols[0] when d is
// nil or has no policy (see LimiterStats).
func (l *Limiter) counted(c limitCount, d *Decision, pols []Policy) {
	l.counts[c].Add(1)
	if l.b.obs == nil {
		return
	}
	var name string
	if d != nil {
		if i := d.binding(); i >= 0 {
			name = d.Policies[i].Policy.Name
		}
	}
	if name == "" && len(pols) > 0 {
		name = pols[0].Name
	}
	o := limitCountObs[c]
	l.b.obs.Observe(Observation{Kind: ObsLimitDecision, Result: o.r, Path: o.p, Name: name, Group: l.name, N: 1})
}

// Allow checks one request (cost 1) for key under the limiter's policies.
func (l *Limiter) Allow(ctx context.Context, key string) (Decision, error) {
	return l.AllowN(ctx, key, 1)
}

// AllowN checks a request of cost n for key under the limiter's policies:
// it is admitted only if every policy has n units left, and then consumes n
// from each. n = 0 reads the state without consuming, and is always
// allowed. It returns ErrCostTooHigh when n exceeds a policy's capacity,
// ErrLimiterUnavailable when Redis cannot decide and the FailurePolicy is
// FailClosed, and the context's error when the caller cancelled it.
func (l *Limiter) AllowN(ctx context.Context, key string, n int64) (Decision, error) {
	if err := checkCost(n, l.policies); err != nil {
		return Decision{}, err
	}
	nkey := normKey(key)
	if l.freePath && n > 0 {
		if d, ok := l.blocks.get(nkey, n); ok {
			l.counted(countMemoryDenied, &d, nil)
			return d, nil
		}
	}
	gen, sent := l.blocks.generation(), l.b.clock.Now()
	d, err := l.decide(ctx, nkey, n, l.policies, l.args)
	if err == nil && l.freePath && !d.Allowed && !d.Degraded && n > 0 {
		l.blocks.put(nkey, d, gen, sent)
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
	if err := checkCost(n, pols); err != nil {
		return Decision{}, err
	}
	return l.decide(ctx, normKey(key), n, pols, policyArgs(pols))
}

// checkCost validates a request's cost against policies.
func checkCost(n int64, pols []Policy) error {
	if n < 0 {
		return fmt.Errorf("%w: negative cost %d", ErrInvalidLimiterConfig, n)
	}
	if len(pols) == 0 {
		return fmt.Errorf("%w: no policy", ErrInvalidLimiterConfig)
	}
	for _, p := range pols {
		if n > p.capacity() {
			return fmt.Errorf("%w: cost %d, policy %s admits at most %d", ErrCostTooHigh, n, p.Name, p.capacity())
		}
	}
	return nil
}

// policyArgs returns limitScript's arguments for pols, 5 per policy.
func policyArgs(pols []Policy) []string {
	args := make([]string, 0, 5*len(pols))
	for _, p := range pols {
		args = append(args, algCode[p.Algorithm], strconv.FormatInt(p.Limit, 10),
			strconv.FormatInt(p.Window.Microseconds(), 10), strconv.FormatInt(p.Burst, 10), p.field()+":")
	}
	return args
}

// decide runs limitScript; static is policyArgs(pols).
func (l *Limiter) decide(ctx context.Context, nkey string, n int64, pols []Policy, static []string) (Decision, error) {
	if nkey == "" {
		return Decision{}, ErrInvalidLimiterKey
	}
	keys := l.keys(nkey)
	scope, notAfter, err := l.notAfter(ctx, keys[0])
	if err == nil {
		args := make([]string, 0, 3+len(static))
		args = append(args, strconv.FormatInt(notAfter, 10), strconv.FormatInt(n, 10), strconv.Itoa(len(pols)))
		args = append(args, static...)
		res := l.b.Exec(ctx, limitScript, keys, args)
		var d Decision
		d, err = l.parseDecision(scope, res, pols, n)
		if err == nil {
			d.key = nkey
			l.counted(verdict(&d, countRedisAllowed, countRedisDenied), &d, pols)
			return d, nil
		}
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		return Decision{}, ctx.Err() // the caller gave up: nothing to decide
	}
	return l.degrade(nkey, n, pols, err)
}

// errLate is the reply of a script that reached Redis after its deadline
// and so charged (or refunded) nothing: the caller had given up, or was
// about to, and applied its failure policy.
var errLate = errors.New("rate limit: the call reached Redis after its deadline; it changed nothing")

// lateMargin is taken off every deadline a script gets (a tenth of the
// Timeout when that is shorter): a script that starts within it of the
// caller's deadline changes nothing, since its reply would likely arrive
// too late to be used.
const lateMargin = time.Millisecond

// notAfter returns the breaker scope of hash's node and the deadline of a
// script call made now, in that node's Redis time (µs): the caller's
// deadline or the limiter's Timeout, whichever comes first, less
// lateMargin. The node's clock offset is learnt from the replies; when it
// is not known yet (the first call to a node, a long idle time), one TIME
// round trip learns it first. On a cluster whose slot map is not loaded
// yet, offsets are learnt per slot (whose node is not known), and used
// for the slot's node once it is.
func (l *Limiter) notAfter(ctx context.Context, hash string) (string, int64, error) {
	scope := l.b.scope(hash)
	unmapped := scope == "cluster" // no slot map yet
	if unmapped {
		scope = slotScope(hash)
	}
	dl := l.callDeadline(ctx)
	if at, ok := l.clocks.redisTime(scope, dl); ok {
		return scope, at, nil
	}
	if !unmapped && l.b.client.Mode() == rueidis.ClientModeCluster {
		if at, ok := l.clocks.redisTime(slotScope(hash), dl); ok {
			return scope, at, nil
		}
	}
	res := l.b.Exec(ctx, timeScript, []string{hash}, nil)
	recv := time.Now()
	now, err := res.AsInt64()
	if err != nil {
		return scope, 0, err
	}
	off := l.clocks.learn(scope, now, recv)
	// The script call that follows gets a Timeout of its own.
	return scope, l.clocks.since(l.callDeadline(ctx)) + off, nil
}

// slotScope is the clock scope of hash's slot.
func slotScope(hash string) string { return "slot " + strconv.Itoa(int(keySlot(hash))) }

// callDeadline is when a call sent now gives up: the backend's Timeout, or
// the caller's own deadline if sooner, less lateMargin.
func (l *Limiter) callDeadline(ctx context.Context) time.Time {
	now := time.Now()
	dl := now.Add(l.b.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = now.Add(time.Until(d)) // monotonic, even for a deadline built from a wall time
	}
	return dl.Add(-min(lateMargin, l.b.timeout/10))
}

// timeScript returns Redis TIME in µs. KEYS[1] is the limited key's hash,
// never touched: it only routes the call to the node that holds the key.
var timeScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
return tonumber(t[1]) * 1000000 + tonumber(t[2])
`)

// redisClocks learns, per Redis node (breaker scope), the offset of its
// TIME from this process's monotonic clock, from the time every script
// reply carries. Each sample is a lower bound: the node read its TIME
// before the reply arrived, so a deadline converted with it falls no later
// in the node's time than in ours, and a script that starts after it
// started after the caller gave up. The tightest bound is kept, aged by
// clockDrift, for up to clockKeep: a looser sample (a slower reply) does
// not replace it, unless it is lower by more than a Timeout (more than a
// reply that came in time can be off: the node's clock stepped back).
type redisClocks struct {
	base    time.Time     // the monotonic origin
	timeout time.Duration // the limiter's Timeout
	nodes   sync.Map      // scope -> *nodeClock
}

// nodeClock is one node's offset.
type nodeClock struct {
	cur atomic.Pointer[clockSample] // one pointer, so offset and age are read together
}

type clockSample struct {
	offset int64 // Redis µs minus local µs
	at     int64 // local µs when learnt
}

const (
	// clockDrift is how fast two clocks may drift apart, in parts per
	// million: each may be slewed by NTP at up to 500 ppm. An offset loses
	// that much precision per second of age, taken off the deadline.
	clockDrift = 1000
	// clockMaxAge is how many Timeouts an offset is used for without a
	// reply refreshing it: at clockDrift, its slack then reaches a tenth
	// of the Timeout, and a TIME round trip learns it afresh.
	clockMaxAge = 100
	// clockKeep is how long the tightest bound is kept against looser
	// samples, which bounds how long a small step back of a node's clock
	// goes unseen.
	clockKeep = time.Second
)

// since returns t in µs of the monotonic clock since base.
func (c *redisClocks) since(t time.Time) int64 { return t.Sub(c.base).Microseconds() }

// learn records that the node behind scope read now (its TIME, µs) before
// a reply that arrived at recv, and returns this sample's offset.
func (c *redisClocks) learn(scope string, now int64, recv time.Time) int64 {
	at := c.since(recv)
	off := now - at
	v, ok := c.nodes.Load(scope)
	if !ok {
		v, _ = c.nodes.LoadOrStore(scope, &nodeClock{})
	}
	nc := v.(*nodeClock)
	if cur, ok := c.offset(nc, at); ok && off < cur && off >= cur-c.timeout.Microseconds() && at-nc.cur.Load().at <= clockKeep.Microseconds() {
		return off // the kept bound is tighter
	}
	nc.cur.Store(&clockSample{offset: off, at: at})
	return off
}

// offset returns nc's offset at local time local (µs), aged by the drift
// gathered since it was learnt; false when none is known, or it is older
// than clockMaxAge Timeouts.
func (c *redisClocks) offset(nc *nodeClock, local int64) (int64, bool) {
	cs := nc.cur.Load()
	if cs == nil {
		return 0, false
	}
	off, at := cs.offset, cs.at
	if at == 0 && off == 0 {
		return 0, false
	}
	age := max(0, local-at)
	if age > clockMaxAge*c.timeout.Microseconds() {
		return 0, false
	}
	return off - age*clockDrift/1_000_000, true
}

// redisTime returns local time t in the Redis time of scope's node (µs);
// false when its offset is not known (see offset).
func (c *redisClocks) redisTime(scope string, t time.Time) (int64, bool) {
	v, ok := c.nodes.Load(scope)
	if !ok {
		return 0, false
	}
	local := c.since(t)
	off, ok := c.offset(v.(*nodeClock), local)
	if !ok {
		return 0, false
	}
	return local + off, true
}

// algCode is each algorithm's number in the scripts.
var algCode = [...]string{SlidingWindow: "1", FixedWindow: "2", SlidingLog: "3", TokenBucket: "4"}

// degrade applies the FailurePolicy to a request Redis could not decide.
//
// An OOM reply (a full Redis refused the admission's first write, so
// nothing was written) is logged as such.
func (l *Limiter) degrade(nkey string, n int64, pols []Policy, cause error) (Decision, error) {
	why := "rate limit: Redis unavailable"
	switch {
	case isOOM(cause):
		why = "rate limit: Redis out of memory (maxmemory) refused an admission"
	case errors.Is(cause, errLate):
		why = "rate limit: a decision reached Redis after its deadline, and charged nothing"
	}
	switch l.onError {
	case FailClosed:
		l.b.log.Error(why+", refusing requests (FailClosed)", cause)
		l.counted(countDegraded, nil, pols)
		return Decision{}, fmt.Errorf("%w: %w", ErrLimiterUnavailable, cause)
	case LocalFallback:
		l.b.log.Error(why+", deciding locally (LocalFallback)", cause)
		d := l.local.decide(nkey, n, pols)
		l.counted(verdict(&d, countFallbackAllowed, countFallbackDenied), &d, pols)
		return d, nil
	default:
		l.b.log.Error(why+", allowing requests (FailOpen)", cause)
		d := Decision{Allowed: true, Time: l.b.clock.Now(), Cost: n, Degraded: true, key: nkey}
		for _, p := range pols {
			d.Policies = append(d.Policies, PolicyDecision{Policy: p, Allowed: true, Remaining: p.capacity()})
		}
		d.bind()
		l.counted(countDegraded, &d, pols)
		return d, nil
	}
}

// bind fills the Decision's summary (Limit, Remaining, Reset, RetryAfter)
// from its binding policy.
func (d *Decision) bind() {
	best := d.binding()
	if best < 0 {
		return
	}
	b := d.Policies[best]
	d.Limit, d.Remaining, d.Reset = b.Policy.capacity(), b.Remaining, b.Reset
	d.RetryAfter = 0
	if !d.Allowed {
		d.RetryAfter = b.RetryAfter
	}
}

// binding returns the index of the Decision's binding policy: when
// allowed, the one with the smallest share of its capacity left (then the
// longest reset); when denied, the one that makes the request wait
// longest. The first wins a tie; -1 when there is no policy.
func (d *Decision) binding() int {
	best := -1
	for i, pd := range d.Policies {
		if best < 0 {
			best = i
			continue
		}
		b := d.Policies[best]
		if d.Allowed {
			// the smallest share left, then the longest reset
			x := float64(pd.Remaining) / float64(pd.Policy.capacity())
			y := float64(b.Remaining) / float64(b.Policy.capacity())
			if x < y || x == y && pd.Reset > b.Reset {
				best = i
			}
		} else if pd.RetryAfter > b.RetryAfter {
			best = i
		}
	}
	return best
}

// parseDecision reads limitScript's reply from scope's node, and learns
// the node's clock from it.
func (l *Limiter) parseDecision(scope string, res rueidis.RedisResult, pols []Policy, n int64) (Decision, error) {
	recv := time.Now()
	arr, err := res.ToArray()
	if err != nil {
		return Decision{}, err
	}
	if len(arr) < 2 {
		return Decision{}, fmt.Errorf("rate limit: unexpected reply of %d elements", len(arr))
	}
	allowed, err1 := arr[0].AsInt64()
	now, err2 := arr[1].AsInt64()
	if err := errors.Join(err1, err2); err != nil {
		return Decision{}, err
	}
	l.clocks.learn(scope, now, recv)
	if allowed == -1 {
		return Decision{}, errLate
	}
	if len(arr) != 2+5*len(pols) {
		return Decision{}, fmt.Errorf("rate limit: unexpected reply of %d elements", len(arr))
	}
	d := Decision{Allowed: allowed == 1, Time: time.UnixMicro(now), Cost: n, Policies: make([]PolicyDecision, len(pols)), refund: &refundState{tokens: make([]string, len(pols))}}
	for i, p := range pols {
		v := arr[2+5*i : 7+5*i]
		rem, e1 := v[0].AsInt64()
		reset, e2 := v[1].AsInt64()
		retry, e3 := v[2].AsInt64()
		next, e4 := v[3].AsInt64()
		tok, e5 := v[4].ToString()
		if err := errors.Join(e1, e2, e3, e4, e5); err != nil {
			return Decision{}, err
		}
		d.Policies[i] = PolicyDecision{Policy: p, Allowed: retry == 0, Remaining: rem,
			Reset: time.Duration(reset) * time.Microsecond, RetryAfter: time.Duration(retry) * time.Microsecond,
			Next: time.Duration(next) * time.Microsecond}
		d.refund.tokens[i] = tok
	}
	d.bind()
	return d, nil
}

// Refund gives back the cost of an allowed decision, under each policy, as
// express-rate-limit's skipSuccessfulRequests does: a fixed window or a
// sliding-window counter only while the decision's window still counts,
// the decision's own log entries, and a token bucket's tokens only as far
// as they have not refilled since. A denied decision consumed nothing and
// refunds nothing; a decision is refunded at most once, through any copy
// (a refund that fails may be tried again: one that timed out and reached
// Redis after its deadline changed nothing, as with decisions; see
// FailurePolicy). The one gap: a refund that ran but whose reply was lost
// is given back again by a retry (a log's entries only once; a counter's
// or a bucket's units twice). A LocalFallback decision is refunded
// locally. Refund also lifts this instance's free-path block of the key;
// other instances keep theirs (see DisableFreePath). Refunds only shrink
// state, so they succeed in a full Redis (maxmemory).
func (l *Limiter) Refund(ctx context.Context, d *Decision) error {
	if d == nil || !d.Allowed || d.Cost == 0 || d.key == "" || d.refund == nil || !d.refund.done.CompareAndSwap(false, true) {
		return nil
	}
	tokens := d.refund.tokens
	l.blocks.delete(d.key)
	if d.local {
		if l.local != nil {
			l.local.refund(d.key, d.Cost, d.Policies, tokens)
		}
		return nil
	}
	keys := l.keys(d.key)
	scope, notAfter, err := l.notAfter(ctx, keys[0])
	if err == nil {
		args := make([]string, 0, 3+6*len(d.Policies))
		args = append(args, strconv.FormatInt(notAfter, 10), strconv.FormatInt(d.Cost, 10), strconv.Itoa(len(d.Policies)))
		for i, pd := range d.Policies {
			p := pd.Policy
			args = append(args, algCode[p.Algorithm], strconv.FormatInt(p.Limit, 10),
				strconv.FormatInt(p.Window.Microseconds(), 10), strconv.FormatInt(p.Burst, 10), p.field()+":", tokens[i])
		}
		err = l.parseRefund(scope, l.b.Exec(ctx, refundScript, keys, args))
	}
	// Again once Redis has the units back: a denial decided before the
	// refund ran may have stored its block after the first delete.
	l.blocks.delete(d.key)
	if err != nil {
		// Nothing was given back (a refund that reached Redis after its
		// deadline changed nothing): it may be tried again.
		d.refund.done.Store(false)
		return fmt.Errorf("rate limit: refund: %w", err)
	}
	return nil
}

// parseRefund reads refundScript's reply from scope's node, and learns the
// node's clock from it.
func (l *Limiter) parseRefund(scope string, res rueidis.RedisResult) error {
	recv := time.Now()
	arr, err := res.AsIntSlice()
	if err != nil {
		return err
	}
	if len(arr) != 2 {
		return fmt.Errorf("rate limit: unexpected refund reply of %d elements", len(arr))
	}
	l.clocks.learn(scope, arr[1], recv)
	if arr[0] != 1 {
		return errLate
	}
	return nil
}

// Reset forgets key's counters under every policy, in Redis and in this
// instance's free path and local fallback (other instances keep their
// blocks until they end, at most a minute; see DisableFreePath).
func (l *Limiter) Reset(ctx context.Context, key string) error {
	if key == "" {
		return ErrInvalidLimiterKey
	}
	nkey := normKey(key)
	l.blocks.delete(nkey)
	if l.local != nil {
		l.local.forget(nkey)
	}
	keys := l.keys(nkey)
	err := l.b.Do(ctx, keys[0], l.b.client.B().Del().Key(keys...).Build()).Error()
	l.blocks.delete(nkey) // see Refund
	return err
}

// limitScript decides one request under several policies, atomically.
//
// KEYS[1]  the key's hash: every policy's state but SlidingLog's, "x" (the
//
//	expiry last set, µs), "lw" and "ll" (the longest SlidingLog window
//	and the largest SlidingLog limit seen, so a call with other log
//	policies never trims entries a longer or larger one still counts,
//	while the log never holds more than ll entries)
//
// KEYS[2]  the key's log: a sorted set of admitted units scored by their
//
//	time (members are distinct integers, compact in a listpack); every
//	SlidingLog policy of the key counts it over its own window
//
// ARGV[1]  deadline, µs of this node's Redis TIME: a call that starts
//
//	later was given up by its caller, and changes nothing
//
// ARGV[2]  cost (0 reads without consuming, and always passes)
// ARGV[3]  number of policies, then 5 per policy: algorithm (1 sliding
//
//	counter, 2 fixed window, 3 sliding log, 4 GCRA), limit, window
//	(µs), burst (GCRA), and the stem of its hash fields (algorithm and
//	window: never the time)
//
// Times are microseconds of Redis TIME; arithmetic is relative to now so
// that doubles stay exact, and numbers are written with %.0f (Lua's own
// conversion loses digits past 14). TIME is read first: past the
// deadline, the script returns at once. Phase one computes every policy's
// verdict without writing; only if all admit does phase two write, so a
// denial consumes nothing, and its first write is deny-OOM, so a full
// Redis refuses an admission whole (and still decides denials and reads).
// Expiry only grows, and is set with some
// headroom (up to a minute), so most calls need no PEXPIREAT: a call with
// short policies never cuts the state a longer one needs.
//
// Reply: allowed (0/1), now, then 5 per policy: remaining, reset (µs until
// whole again), retry (µs until this cost would pass; 0 when it passes),
// next (µs until more than remaining is available), refund token. Past the
// deadline: -1, now.
var limitScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if now > tonumber(ARGV[1]) then return {-1, now} end
local cost, np = tonumber(ARGV[2]), tonumber(ARGV[3])
local hash, logk = KEYS[1], KEYS[2]
local EPS = 1e-9
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min
local function fmt(x) return string.format('%.0f', x) end

local pol, fields, logwin, loglim, maxwin = {}, {'x', 'lw', 'll'}, 0, 0, 0
for i = 1, np do
  local b = i * 5 - 1
  local alg, win = tonumber(ARGV[b]), tonumber(ARGV[b + 2])
  local p = {alg = alg, limit = tonumber(ARGV[b + 1]), win = win, burst = tonumber(ARGV[b + 3]), f = ARGV[b + 4], at = #fields + 1}
  -- Rounding slack, relative to the size of the numbers compared.
  p.eps = EPS + max(p.limit, p.burst) * 1e-13
  if alg == 1 then
    fields[#fields + 1] = p.f .. 'w'; fields[#fields + 1] = p.f .. 'c'; fields[#fields + 1] = p.f .. 'p'
  elseif alg == 2 then
    fields[#fields + 1] = p.f .. 's'; fields[#fields + 1] = p.f .. 'n'
  elseif alg == 3 then
    if win > logwin then logwin = win end
    if p.limit > loglim then loglim = p.limit end
  else
    fields[#fields + 1] = p.f .. 't'
  end
  if win > maxwin then maxwin = win end
  pol[i] = p
end
local v = redis.call('HMGET', hash, unpack(fields))
local x0, lw0, ll0 = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
local lw, ll = max(lw0, logwin), max(ll0, loglim)
if logwin > 0 and not x0 then
  -- The hash is gone (new key, or evicted) but a log may remain: keep what
  -- it may still hold for policies this call does not know of, as far as
  -- its TTL and its size tell.
  local pt = redis.call('PTTL', logk)
  if pt > 0 then
    lw = max(lw, pt * 1000)
    ll = max(ll, redis.call('ZCARD', logk))
  end
end
local allowed = 1
for i = 1, np do
  local p = pol[i]
  local alg, limit, win, at = p.alg, p.limit, p.win, p.at
  local avail
  if alg == 1 then
    local idx = floor(now / win)
    local sidx, cur, prev = tonumber(v[at]), tonumber(v[at + 1]) or 0, tonumber(v[at + 2]) or 0
    if sidx and sidx > idx then idx = sidx -- Redis time stepped back
    elseif sidx ~= idx then
      if sidx == idx - 1 then prev = cur else prev = 0 end
      cur = 0
    end
    p.idx, p.cur, p.prev, p.el = idx, cur, prev, max(0, now - idx * win)
    avail = limit - (prev * (win - p.el) / win + cur)
  elseif alg == 2 then
    local start, n = tonumber(v[at]), tonumber(v[at + 1]) or 0
    if not start or now >= start + win then start, n = now, 0 end
    p.start, p.n = start, n
    avail = limit - n
  elseif alg == 3 then
    p.count = redis.call('ZCOUNT', logk, '(' .. fmt(now - win), '+inf')
    avail = limit - p.count
  else
    p.T = win / limit
    p.x = max(0, (tonumber(v[at]) or now) - now) -- µs the bucket is behind full
    p.eps = p.eps + 0.5 / p.T -- the arrival time is stored to the nearest µs
    avail = floor(p.burst - p.x / p.T + p.eps)
  end
  p.avail = avail
  if cost == 0 or avail + p.eps >= cost then p.ok = true else allowed = 0 end
end

-- wait returns the µs until p has need units (need <= its capacity).
local function wait(p, need)
  local alg, limit, win = p.alg, p.limit, p.win
  if alg == 1 then
    local el, cur, prev = p.el, p.cur, p.prev
    if prev * (win - el) / win + cur + need <= limit + p.eps then return 0 end
    local room = limit - cur - need
    if room >= 0 and prev > 0 then
      local e = win - room * win / prev
      if e < win then return max(1, ceil(e - el) + 1) end
    end
    local e = 0
    if cur > 0 then e = max(0, win - (limit - need) * win / cur) end
    return ceil(win - el + e) + 1
  elseif alg == 2 then
    if p.n + need <= limit then return 0 end
    return max(1, p.start + win - now)
  elseif alg == 3 then
    local k = p.count + need - limit
    if k <= 0 then return 0 end
    local e = redis.call('ZRANGE', logk, '(' .. fmt(now - win), '+inf', 'BYSCORE', 'LIMIT', k - 1, 1, 'WITHSCORES')
    if not e[2] then return win end -- the units are this call's own
    return max(1, tonumber(e[2]) + win - now)
  end
  if p.burst - p.x / p.T + p.eps >= need then return 0 end
  return max(1, ceil(p.x + (need - p.burst) * p.T))
end

-- Phase two writes. Under maxmemory, Redis 7.0 refuses a script's write
-- only when it is the script's first write and a deny-OOM command: the
-- first write here is always ZADD (with a log) or HSET, both deny-OOM, so
-- a full Redis refuses the whole admission before anything is written.
-- Nothing before this point writes: a denial or a read (cost 0) writes
-- nothing, and works in a full Redis.
local members, took = '', allowed == 1 and cost > 0
if took then
  local set, need = {}, 0 -- need: µs from now the state must live
  for i = 1, np do
    local p = pol[i]
    local alg, f = p.alg, p.f
    if alg == 1 then
      p.cur = p.cur + cost
      set[#set + 1] = f .. 'w'; set[#set + 1] = fmt(p.idx)
      set[#set + 1] = f .. 'c'; set[#set + 1] = fmt(p.cur)
      set[#set + 1] = f .. 'p'; set[#set + 1] = fmt(p.prev)
      need = max(need, 2 * p.win - p.el)
    elseif alg == 2 then
      p.n = p.n + cost
      set[#set + 1] = f .. 's'; set[#set + 1] = fmt(p.start)
      set[#set + 1] = f .. 'n'; set[#set + 1] = fmt(p.n)
      need = max(need, p.start + p.win - now)
    elseif alg == 3 then
      p.count = p.count + cost
    else
      p.x = p.x + cost * p.T
      p.tok = fmt(now + floor(p.x + 0.5))
      p.x = tonumber(p.tok) - now -- what is stored: every figure from it
      set[#set + 1] = f .. 't'; set[#set + 1] = p.tok
      need = max(need, p.x)
    end
    if alg == 4 then p.avail = floor(p.burst - p.x / p.T + p.eps) else p.avail = p.avail - cost end
  end
  local freshlog = false
  if logwin > 0 then
    freshlog = redis.call('EXISTS', logk) == 0
    -- Members are distinct integers from now on (compact in a listpack);
    -- ZMSCORE finds those taken by calls in the same microseconds. Calls
    -- go by chunks of 500 (Lua's unpack has a limit).
    local list, m = {}, now
    while #list < cost do
      local cand = {}
      for j = 1, min(cost - #list, 500) do cand[j] = fmt(m); m = m + 1 end
      local taken = redis.call('ZMSCORE', logk, unpack(cand))
      local args = {}
      for j = 1, #cand do
        if not taken[j] then
          list[#list + 1] = cand[j]
          args[#args + 1] = now; args[#args + 1] = cand[j]
        end
      end
      if #args > 0 then redis.call('ZADD', logk, unpack(args)) end
    end
    -- Trimmed only now, after the first write (see above); counts never
    -- need it, as they only look at the policy's window. A SlidingLog of
    -- limit L only ever needs the newest L entries.
    redis.call('ZREMRANGEBYSCORE', logk, '-inf', fmt(now - lw))
    redis.call('ZREMRANGEBYRANK', logk, 0, -ll - 1)
    members = table.concat(list, ' ')
    if lw > lw0 then set[#set + 1] = 'lw'; set[#set + 1] = fmt(lw) end
    if ll > ll0 then set[#set + 1] = 'll'; set[#set + 1] = fmt(ll) end
  end
  if lw > 0 then need = max(need, lw) end
  if not x0 or x0 < now + need then
    local x = now + need + min(maxwin, 60000000)
    set[#set + 1] = 'x'; set[#set + 1] = fmt(x)
    redis.call('HSET', hash, unpack(set))
    redis.call('PEXPIREAT', hash, fmt(ceil(x / 1000)))
    if lw > 0 then redis.call('PEXPIREAT', logk, fmt(ceil(x / 1000))) end
  else
    if #set > 0 then redis.call('HSET', hash, unpack(set)) end
    if freshlog or lw > lw0 then redis.call('PEXPIREAT', logk, fmt(ceil(x0 / 1000))) end
  end
end

local out = {allowed, now}
for i = 1, np do
  local p = pol[i]
  local alg, win = p.alg, p.win
  local rem = max(0, floor(p.avail + p.eps))
  local cap, nxt, reset, tok = p.limit
  if alg == 4 then cap = p.burst end
  if rem + 1 > cap then
    if alg == 4 then nxt = ceil(p.T) else nxt = win end
  else
    nxt = wait(p, rem + 1)
  end
  if alg == 1 then
    if p.cur > 0 then reset = 2 * win - p.el elseif p.prev > 0 then reset = win - p.el else reset = 0 end
    tok = fmt(p.idx)
  elseif alg == 2 then
    if p.n > 0 then reset = p.start + win - now else reset = 0 end
    tok = fmt(p.start)
  elseif alg == 3 then
    if p.count == 0 then reset = 0
    elseif took then reset = win
    else
      local e = redis.call('ZRANGE', logk, '+inf', '(' .. fmt(now - win), 'BYSCORE', 'REV', 'LIMIT', 0, 1, 'WITHSCORES')
      reset = e[2] and (tonumber(e[2]) + win - now) or 0
    end
    tok = members
  else
    reset = p.x
    tok = p.tok or fmt(now + floor(p.x + 0.5))
  end
  local retry = 0
  if not p.ok then retry = max(1, wait(p, cost)) end
  out[#out + 1] = rem
  out[#out + 1] = max(0, ceil(reset))
  out[#out + 1] = retry
  out[#out + 1] = nxt
  out[#out + 1] = tok
end
return out
`)

// refundScript gives back a decision's cost.
//
// KEYS    as limitScript's
// ARGV[1] deadline, as limitScript's
// ARGV[2] cost
// ARGV[3] number of policies, then 6 per policy: algorithm, limit, window
// (µs), burst, field stem (as limitScript's), and the decision's refund
// token: the sliding counter's window index, the fixed window's start, the
// log members the decision added, or the bucket's arrival time the
// decision set.
//
// Reply: 1, now; or, past the deadline and having changed nothing, -1, now.
var refundScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if now > tonumber(ARGV[1]) then return {-1, now} end
local cost = tonumber(ARGV[2])
local np = tonumber(ARGV[3])
local hash, logk = KEYS[1], KEYS[2]
local function fmt(x) return string.format('%.0f', x) end
-- A refund only rewrites existing fields with numbers no longer than
-- theirs, or removes: it never grows memory, and may run in a full Redis.
-- Its first write is a no-op HDEL (not deny-OOM), after which Redis 7.0
-- lets the others through under maxmemory, so a refund is applied whole
-- whatever the order of its policies' writes.
redis.call('HDEL', hash, '')
for i = 1, np do
  local b = i * 6 - 2
  local alg, limit, win, f, tok = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), ARGV[b + 4], ARGV[b + 5]
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
    local ms = {}
    for m in string.gmatch(tok, '%S+') do
      ms[#ms + 1] = m
      if #ms == 500 then redis.call('ZREM', logk, unpack(ms)); ms = {} end
    end
    if #ms > 0 then redis.call('ZREM', logk, unpack(ms)) end
  else
    local tat, set = tonumber(redis.call('HGET', hash, f .. 't')), tonumber(tok)
    if tat and set then
      -- Give back only what has not refilled since: the part of the
      -- decision's cost still ahead of now.
      -- (Rounded to whole µs before it meets the absolute time, so the
      -- arithmetic stays exact.)
      local back = math.floor(math.min(cost * win / limit, math.max(0, set - now)) + 0.5)
      tat = tat - back
      if tat <= now then redis.call('HDEL', hash, f .. 't')
      else redis.call('HSET', hash, f .. 't', fmt(tat)) end
    end
  end
end
return {1, now}
`)

// blockMap is the free path: keys denied until a known time, with the
// decision that denied them. Lookups take no lock.
type blockMap struct {
	clock Clock
	m     sync.Map // normalized key -> *block
	n     atomic.Int64
	sweep atomic.Int64 // unix nanos of the next sweep

	mu  sync.Mutex    // orders put and delete
	gen atomic.Uint64 // bumped by every delete
}

type block struct {
	d     Decision
	at    time.Time // local time the request was sent
	until time.Time // local time the denial ends
}

const (
	// maxBlocks bounds the free path's map; beyond it, new blocks are not
	// remembered until a sweep frees room (requests then go to Redis).
	maxBlocks = 100_000
	// maxBlockTime bounds how long a block is trusted without asking
	// Redis again, in case Redis lost the key's state (an eviction, a
	// failover) or another instance reset it.
	maxBlockTime = time.Minute
)

// generation returns the current generation; put drops blocks whose
// decision started before a later delete.
func (m *blockMap) generation() uint64 { return m.gen.Load() }

func (m *blockMap) get(key string, cost int64) (Decision, bool) {
	v, ok := m.m.Load(key)
	if !ok {
		return Decision{}, false
	}
	b := v.(*block)
	now := m.clock.Now()
	if !now.Before(b.until) {
		m.mu.Lock()
		if m.m.CompareAndDelete(key, v) {
			m.n.Add(-1)
		}
		m.mu.Unlock()
		return Decision{}, false
	}
	if cost != b.d.Cost {
		return Decision{}, false // another cost passes at another time
	}
	// Rebase the denial's durations on the time that passed since.
	d := b.d
	d.Policies = append([]PolicyDecision(nil), b.d.Policies...)
	passed := now.Sub(b.at)
	for i := range d.Policies {
		pd := &d.Policies[i]
		pd.Reset = max(0, pd.Reset-passed)
		pd.RetryAfter = max(0, pd.RetryAfter-passed)
		pd.Next = max(0, pd.Next-passed)
		pd.Allowed = pd.RetryAfter == 0
	}
	d.bind()
	d.RetryAfter = max(d.RetryAfter, b.until.Sub(now))
	d.Time, d.Cost, d.FromMemory = now, cost, true
	return d, true
}

// put remembers a denial whose request was sent at sent (local time, never
// later than Redis's decision), unless a delete happened since gen.
func (m *blockMap) put(key string, d Decision, gen uint64, sent time.Time) {
	if d.RetryAfter <= 0 {
		return
	}
	now := m.clock.Now()
	m.sweepExpired(now)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gen.Load() != gen || m.n.Load() >= maxBlocks {
		return
	}
	b := &block{d: d, at: sent, until: sent.Add(min(d.RetryAfter, maxBlockTime))}
	b.d.refund = nil
	b.d.Policies = append([]PolicyDecision(nil), d.Policies...) // the caller keeps its own
	if _, loaded := m.m.Swap(key, b); !loaded {
		m.n.Add(1)
	}
}

func (m *blockMap) delete(key string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gen.Add(1)
	if _, ok := m.m.LoadAndDelete(key); ok {
		m.n.Add(-1)
	}
}

// sweepExpired drops ended blocks, at most once a second.
func (m *blockMap) sweepExpired(now time.Time) {
	next := m.sweep.Load()
	if now.UnixNano() < next || !m.sweep.CompareAndSwap(next, now.Add(time.Second).UnixNano()) {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
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

// localState holds one policy's counters, in microseconds of the local
// clock: a (window index or start), c (count), p (previous count), tat
// (GCRA's arrival time) and the log.
type localState struct {
	a, c, p, tat float64
	log          []float64
}

// maxLocalKeys bounds the fallback's keys; beyond it, ended states are
// swept, then a random tenth is dropped. Only admitted requests create
// state, and a SlidingLog keeps at most MaxSlidingLogLimit entries.
const maxLocalKeys = 100_000

// scaled returns p's limits for this instance.
func (ll *localLimiter) scaled(p Policy) (limit, burst float64) {
	limit = math.Max(1, math.Floor(float64(p.Limit)*ll.share))
	burst = math.Max(1, math.Floor(float64(p.Burst)*ll.share))
	return limit, burst
}

func (ll *localLimiter) decide(nkey string, n int64, pols []Policy) Decision {
	now := ll.clock.Now()
	us := float64(now.UnixMicro())
	ll.mu.Lock()
	defer ll.mu.Unlock()
	if now.After(ll.sweep) {
		for k, v := range ll.keys {
			if now.After(v.expires) {
				delete(ll.keys, k)
			}
		}
		ll.sweep = now.Add(time.Second)
	}
	lk := ll.keys[nkey]
	states := make([]localState, len(pols))
	for i, p := range pols {
		if lk != nil {
			if st := lk.st[p.field()]; st != nil {
				states[i] = *st
				states[i].log = append([]float64(nil), st.log...)
			}
		}
	}
	d := Decision{Allowed: true, Time: now, Cost: n, Degraded: true, local: true, key: nkey,
		Policies: make([]PolicyDecision, len(pols)), refund: &refundState{tokens: make([]string, len(pols))}}
	// Pass one decides without consuming; pass two, when every policy
	// admits, consumes, so a denial reports what is really left.
	for i, p := range pols {
		_, d.Policies[i], _ = ll.eval(p, states[i], us, n, false)
		if !d.Policies[i].Allowed {
			d.Allowed = false
		}
	}
	if d.Allowed && n > 0 {
		if lk == nil {
			if len(ll.keys) >= maxLocalKeys {
				ll.evict()
			}
			lk = &localKey{st: map[string]*localState{}}
			ll.keys[nkey] = lk
		}
		for i, p := range pols {
			st, pd, tok := ll.eval(p, states[i], us, n, true)
			d.Policies[i], d.refund.tokens[i] = pd, tok
			lk.st[p.field()] = &st
			until := now.Add(2 * p.Window)
			if p.Algorithm == TokenBucket {
				until = time.UnixMicro(int64(st.tat)).Add(time.Second)
			}
			if until.After(lk.expires) {
				lk.expires = until
			}
		}
	}
	d.bind()
	return d
}

// eval decides one policy on its state s at time us (µs): the state after
// the request (consumed when consume and it fits), the policy's part of
// the decision, and its refund token.
func (ll *localLimiter) eval(p Policy, s localState, us float64, n int64, consume bool) (localState, PolicyDecision, string) {
	cost := float64(n)
	limit, burst := ll.scaled(p)
	capacity := limit
	if p.Algorithm == TokenBucket {
		capacity = burst
	}
	win := float64(p.Window.Microseconds())
	var avail, reset, retry, elapsed, x, T float64
	var tok string
	switch p.Algorithm {
	case SlidingWindow:
		idx := math.Floor(us / win)
		if s.a > idx {
			idx = s.a
		} else if s.a != idx {
			if s.a == idx-1 {
				s.p = s.c
			} else {
				s.p = 0
			}
			s.c = 0
		}
		s.a = idx
		elapsed = math.Max(0, us-idx*win)
		avail = limit - (s.p*(win-elapsed)/win + s.c)
		if avail < cost {
			retry = slidingWait(s.p, s.c, limit, win, elapsed, cost)
		} else if consume {
			s.c += cost
			avail -= cost
		}
		reset = 2*win - elapsed
		tok = strconv.FormatFloat(idx, 'f', 0, 64)
	case FixedWindow:
		if s.a == 0 || us >= s.a+win {
			s.a, s.c = us, 0
		}
		avail = limit - s.c
		if avail < cost {
			retry = s.a + win - us
		} else if consume {
			s.c += cost
			avail -= cost
		}
		reset = s.a + win - us
		tok = strconv.FormatFloat(s.a, 'f', 0, 64)
	case SlidingLog:
		kept := s.log[:0]
		for _, ts := range s.log {
			if ts > us-win {
				kept = append(kept, ts)
			}
		}
		s.log = kept
		avail = limit - float64(len(s.log))
		if avail < cost {
			if k := int(float64(len(s.log)) + cost - limit); k <= len(s.log) {
				retry = s.log[k-1] + win - us
			} else {
				retry = win
			}
		} else if consume {
			for range n {
				s.log = append(s.log, us)
			}
			avail -= cost
		}
		reset = win
		tok = strconv.FormatFloat(us, 'f', 0, 64)
	case TokenBucket:
		T = win / limit
		x = math.Max(0, s.tat-us)
		avail = math.Floor(burst - x/T + 1e-9)
		if avail < cost {
			retry = math.Max(1, x+(cost-burst)*T)
		} else if consume {
			x += cost * T
			s.tat = us + x
			avail -= cost
		}
		reset = x
		tok = strconv.FormatFloat(s.tat, 'f', 0, 64)
	}
	if cost > capacity {
		retry = win // this instance alone can never admit it
	}
	// Next: the time until more than what is left is available.
	var nxt float64
	rem := math.Max(0, math.Floor(avail))
	switch {
	case rem+1 > capacity && p.Algorithm == TokenBucket:
		nxt = T
	case rem+1 > capacity:
		nxt = win
	case p.Algorithm == SlidingWindow:
		nxt = slidingWait(s.p, s.c, limit, win, elapsed, rem+1)
	case p.Algorithm == FixedWindow:
		nxt = s.a + win - us
	case p.Algorithm == SlidingLog:
		nxt = win
		if k := len(s.log) + int(rem) + 1 - int(limit); k >= 1 && k <= len(s.log) {
			nxt = s.log[k-1] + win - us
		}
	case p.Algorithm == TokenBucket:
		nxt = math.Max(1, x+(rem+1-burst)*T)
	}
	pd := PolicyDecision{Policy: p, Allowed: n == 0 || retry == 0, Remaining: int64(rem),
		Reset:      time.Duration(math.Ceil(math.Max(0, reset))) * time.Microsecond,
		RetryAfter: time.Duration(math.Ceil(math.Max(0, retry))) * time.Microsecond,
		Next:       time.Duration(math.Ceil(math.Max(0, nxt))) * time.Microsecond}
	pd.Policy.Limit, pd.Policy.Burst = int64(limit), int64(burst)
	if p.Algorithm != TokenBucket {
		pd.Policy.Burst = 0
	}
	return s, pd, tok
}

// slidingWait is the sliding counter's wait for need units, as in the
// script: while the previous window slides out, or in the next window.
func slidingWait(prev, cur, limit, win, elapsed, need float64) float64 {
	room := limit - cur - need
	if room >= 0 && prev > 0 {
		if e := win - room*win/prev; e < win {
			return math.Max(1, math.Ceil(e-elapsed)+1)
		}
	}
	e := 0.0
	if cur > 0 {
		e = math.Max(0, win-(limit-need)*win/cur)
	}
	return math.Ceil(win-elapsed+e) + 1
}

// evict drops a random tenth of the keys (map order is random), so a
// flood of new keys cannot wipe everyone's state at once.
func (ll *localLimiter) evict() {
	drop := len(ll.keys) / 10
	for k := range ll.keys {
		if drop <= 0 {
			break
		}
		delete(ll.keys, k)
		drop--
	}
}

// refund gives back a local decision's cost.
func (ll *localLimiter) refund(nkey string, cost int64, pds []PolicyDecision, tokens []string) {
	ll.mu.Lock()
	defer ll.mu.Unlock()
	lk := ll.keys[nkey]
	if lk == nil {
		return
	}
	c := float64(cost)
	now := float64(ll.clock.Now().UnixMicro())
	for i, pd := range pds {
		s := lk.st[pd.Policy.field()]
		if s == nil {
			continue
		}
		tok, _ := strconv.ParseFloat(tokens[i], 64)
		switch pd.Policy.Algorithm {
		case SlidingWindow:
			if s.a == tok {
				s.c = math.Max(0, s.c-c)
			} else if s.a == tok+1 {
				s.p = math.Max(0, s.p-c)
			}
		case FixedWindow:
			if s.a == tok {
				s.c = math.Max(0, s.c-c)
			}
		case SlidingLog:
			for j := len(s.log) - 1; j >= 0 && c > 0; j-- {
				if s.log[j] == tok {
					s.log = append(s.log[:j], s.log[j+1:]...)
					c--
				}
			}
			c = float64(cost)
		case TokenBucket:
			T := float64(pd.Policy.Window.Microseconds()) / float64(pd.Policy.Limit)
			s.tat -= math.Min(c*T, math.Max(0, tok-now))
		}
	}
}

// forget drops a key's local state.
func (ll *localLimiter) forget(nkey string) {
	ll.mu.Lock()
	delete(ll.keys, nkey)
	ll.mu.Unlock()
}

// RateLimitConfig configures the rate limit middleware.
type RateLimitConfig struct {
	// Limiter decides. Default: a Limiter built from Client, Options, Name,
	// Policies, OnRedisError and FallbackShare, with the free path on
	// unless Cost, PolicyFunc, SkipSuccessfulRequests or
	// SkipFailedRequests is set. When set, those fields must be left
	// zero.
	Limiter *Limiter
	// Client is the rueidis client; required when Limiter is nil.
	Client rueidis.Client
	// Options is the shared plumbing, used when Limiter is nil.
	Options
	// Name separates this middleware's counters from other limiters'
	// (LimiterConfig.Name). Give each differently configured middleware
	// its own: the same Name with other policies is refused. Default:
	// "default".
	Name string
	// Policies are the limits, decided together (LimiterConfig.Policies).
	// Default: PerMinute(100), a sliding window.
	Policies []Policy
	// PolicyFunc, when set, returns the policies of a request (a plan's
	// limits), used instead of Policies; none means the request is not
	// limited. It turns the free path off. Default: nil.
	PolicyFunc func(c echo.Context) []Policy
	// OnRedisError is the FailurePolicy (LimiterConfig.OnRedisError).
	// Default: FailOpen.
	OnRedisError FailurePolicy
	// FallbackShare is each instance's share under LocalFallback
	// (LimiterConfig.FallbackShare). Default: 0 (required with
	// LocalFallback).
	FallbackShare float64

	// KeyFunc returns the key a request is counted under. An
	// *echo.HTTPError it returns is answered as is (a 401 for a missing
	// API key, say); any other error, or an empty key, is logged and
	// answered with a bare 500. Default: IPKey(DefaultIPv6Prefix).
	KeyFunc func(c echo.Context) (string, error)
	// Cost returns a request's cost in units; 0 lets the request through
	// uncounted. It turns the free path off. A cost above a policy's
	// capacity is answered with 400. Default: 1 for every request.
	Cost func(c echo.Context) int64
	// Skipper skips the middleware for a request. Default: never skip.
	Skipper middleware.Skipper

	// SkipSuccessfulRequests refunds requests that succeeded, so only
	// failures count (the guide's login limiter). It turns the free path
	// off. Default: false.
	SkipSuccessfulRequests bool
	// SkipFailedRequests refunds requests that failed (a panic is a
	// failure). It turns the free path off. Default: false.
	SkipFailedRequests bool
	// RequestWasSuccessful tells success from failure for the two options
	// above; err is the handler's error. Default: a final status below 400.
	RequestWasSuccessful func(c echo.Context, err error) bool

	// Message is the JSON body of a 429. Default:
	// {"error": "Too many requests, please try again later."}.
	Message any
	// DeniedHandler, when set, answers denied requests instead of the 429
	// with Message. The rate limit headers are already set. Default: nil.
	DeniedHandler func(c echo.Context, d Decision) error
	// UnavailableMessage is the JSON body of the 503 a FailClosed limiter
	// answers while Redis cannot decide, with a Retry-After of the
	// breaker's cool-down. Default:
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

// rateLimitContextKey is the echo.Context key of the request's Decision.
const rateLimitContextKey = "redisecho.ratelimit"

// RateLimit returns the rate limit middleware for client: every request
// counted under its client IP (IPKey) by policies, PerMinute(100) when none
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

// GetRateLimit returns the decision of the innermost rate limit middleware
// that handled the request (express-rate-limit's req.rateLimit), and false
// when none decided (skipped, or no middleware).
func GetRateLimit(c echo.Context) (Decision, bool) {
	d, ok := c.Get(rateLimitContextKey).(Decision)
	return d, ok
}

// IPKey returns a KeyFunc counting requests by client address, from Echo's
// RealIP: the connection's peer unless the Echo instance has an
// IPExtractor, which must be set behind a proxy (see the README). IPv4
// addresses (and IPv4-mapped IPv6) count one by one; IPv6 addresses are
// grouped by their first v6Prefix bits, 1 to 128 (128 counts each address
// alone); any other v6Prefix means DefaultIPv6Prefix (64).
func IPKey(v6Prefix int) func(c echo.Context) (string, error) {
	if v6Prefix <= 0 || v6Prefix > 128 {
		v6Prefix = DefaultIPv6Prefix
	}
	return func(c echo.Context) (string, error) {
		ip := c.RealIP()
		if ip == "" {
			return "", errors.New("rate limit: the request has no client address (a unix socket without an IPExtractor?)")
		}
		return clientIP(ip, v6Prefix), nil
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
// returns the ID of the request's user, or "" when anonymous (so the
// middleware that identifies users must run first). v6Prefix is IPKey's.
// The two kinds never collide ("user:" and "ip:" prefixes).
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

// RouteKey returns a KeyFunc that counts each route apart: key's key
// joined with the request's method and route pattern ("GET /users/:id"),
// like httprate's KeyByEndpoint. Use it when one limiter guards several
// routes that should each have the full limit. The route is known only
// once Echo has routed the request: use the middleware with e.Use, on a
// group or on a route, not with e.Pre (there every request would count
// under its method alone). Requests that match no route share one quota
// per method.
func RouteKey(key func(c echo.Context) (string, error)) func(c echo.Context) (string, error) {
	return func(c echo.Context) (string, error) {
		k, err := key(c)
		if err != nil || k == "" {
			return k, err
		}
		return joinKey(c.Request().Method, c.Path(), k), nil
	}
}

// joinKey joins parts with ':', each escaped, so that different part lists
// never give the same key.
func joinKey(parts ...string) string {
	var b strings.Builder
	writeParts(&b, parts)
	return b.String()
}

// rateLimit is the middleware's state.
type rateLimit struct {
	l            *Limiter
	cfg          RateLimitConfig
	refunds      bool
	policyHeader string // RateLimit-Policy of the Limiter's policies
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
	} else {
		if cfg.Client != nil || cfg.Options != (Options{}) || cfg.Name != "" || cfg.Policies != nil || cfg.OnRedisError != FailOpen || cfg.FallbackShare != 0 {
			return nil, fmt.Errorf("%w: with a Limiter, configure Client, Options, Name, Policies, OnRedisError and FallbackShare on the Limiter", ErrInvalidLimiterConfig)
		}
		if refunds && cfg.Limiter.freePath {
			return nil, fmt.Errorf("%w: SkipSuccessfulRequests and SkipFailedRequests refund, which the free path cannot see: give a Limiter with DisableFreePath", ErrInvalidLimiterConfig)
		}
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
		cfg.Message = map[string]string{"error": "Too many requests, please try again later."}
	}
	if cfg.UnavailableMessage == nil {
		cfg.UnavailableMessage = map[string]string{"error": "Service temporarily unavailable, please try again later."}
	}
	rl := &rateLimit{l: cfg.Limiter, cfg: cfg, refunds: refunds}
	pds := make([]PolicyDecision, len(rl.l.policies))
	for i, p := range rl.l.policies {
		pds[i].Policy = p
	}
	rl.policyHeader = policyHeader(pds)
	return rl.middleware, nil
}

// statusBelow400 is the default RequestWasSuccessful.
func statusBelow400(c echo.Context, err error) bool {
	return responseStatus(c, err) < 400
}

// responseStatus is the status a request ends with: the one Echo's default
// error handler will send for the handler's error when nothing was
// written, the response's otherwise.
func responseStatus(c echo.Context, err error) int {
	if err != nil && !c.Response().Committed {
		if he, ok := err.(*echo.HTTPError); ok {
			if in, ok := he.Internal.(*echo.HTTPError); ok {
				return in.Code
			}
			return he.Code
		}
		return http.StatusInternalServerError
	}
	return c.Response().Status
}

// errRateLimitKey is the bare 500 of a request whose key cannot be made.
var errRateLimitKey = echo.NewHTTPError(http.StatusInternalServerError)

func (rl *rateLimit) middleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) (err error) {
		if rl.cfg.Skipper(c) {
			return next(c)
		}
		key, err := rl.cfg.KeyFunc(c)
		if err != nil {
			if he, ok := err.(*echo.HTTPError); ok {
				return he
			}
			rl.l.b.log.Error("rate limit: key function failed", err)
			return errRateLimitKey
		}
		if key == "" {
			rl.l.b.log.Error("rate limit: key function returned an empty key", nil)
			return errRateLimitKey
		}
		cost := int64(1)
		if rl.cfg.Cost != nil {
			cost = rl.cfg.Cost(c)
		}
		ctx := c.Request().Context()
		var d Decision
		if rl.cfg.PolicyFunc != nil {
			pols := rl.cfg.PolicyFunc(c)
			if len(pols) == 0 {
				return next(c) // an unlimited plan
			}
			d, err = rl.l.AllowPolicies(ctx, key, cost, pols...)
		} else {
			d, err = rl.l.AllowN(ctx, key, cost)
		}
		switch {
		case err == nil:
		case errors.Is(err, ErrLimiterUnavailable):
			// Ask again once the breaker may let a call through.
			c.Response().Header().Set(echo.HeaderRetryAfter, strconv.FormatInt(max(1, seconds(rl.l.b.breaker.cooldown)), 10))
			return c.JSON(http.StatusServiceUnavailable, rl.cfg.UnavailableMessage)
		case errors.Is(err, ErrCostTooHigh):
			return echo.NewHTTPError(http.StatusBadRequest, "request costs more than the rate limit allows")
		case errors.Is(err, context.Canceled):
			return err // the client went away
		default:
			rl.l.b.log.Error("rate limit: cannot decide", err)
			return echo.NewHTTPError(http.StatusInternalServerError)
		}
		c.Set(rateLimitContextKey, d)
		if !d.Degraded || d.local {
			rl.setHeaders(c.Response().Header(), d)
		}
		if !d.Allowed {
			if rl.cfg.DeniedHandler != nil {
				return rl.cfg.DeniedHandler(c, d)
			}
			return c.JSON(http.StatusTooManyRequests, rl.cfg.Message)
		}
		if !rl.refunds {
			return next(c)
		}
		panicked := true
		defer func() {
			ok := !panicked && rl.cfg.RequestWasSuccessful(c, err)
			if ok && rl.cfg.SkipSuccessfulRequests || !ok && rl.cfg.SkipFailedRequests {
				if rerr := rl.l.Refund(context.WithoutCancel(ctx), &d); rerr != nil {
					rl.l.b.log.Error("rate limit: refund failed", rerr)
				}
			}
		}()
		err = next(c)
		panicked = false
		return err
	}
}

// setHeaders writes the decision's headers: the RateLimit-Policy and
// RateLimit fields of draft-ietf-httpapi-ratelimit-headers-11 (added, so
// that stacked limiters each list their policies), the legacy
// X-RateLimit-* of the binding policy, and Retry-After when denied.
//
// RateLimit-Policy lists every policy: q is its quota over w seconds (a
// TokenBucket's Burst over the time it takes to refill; a window that is
// not whole seconds is rounded up, and q scaled to it). RateLimit lists
// every policy when the request passed, and on a 429 only the refusing
// ones (replacing an outer limiter's members): r is the units left, t the
// seconds within which no more than r are available (the draft's effective
// window), never beyond Retry-After.
func (rl *rateLimit) setHeaders(h http.Header, d Decision) {
	retry := seconds(d.RetryAfter)
	if !rl.cfg.DisableDraftHeaders && len(d.Policies) > 0 {
		pol := rl.policyHeader
		if d.local || rl.cfg.PolicyFunc != nil {
			pol = policyHeader(d.Policies)
		}
		var buf [64]byte
		cur := buf[:0]
		for _, pd := range d.Policies {
			if !d.Allowed && pd.Allowed {
				continue
			}
			if len(cur) > 0 {
				cur = append(cur, ", "...)
			}
			cur = appendSFString(cur, pd.Policy.Name)
			cur = append(cur, ";r="...)
			cur = strconv.AppendInt(cur, pd.Remaining, 10)
			t := seconds(pd.Next)
			if !d.Allowed {
				t = min(t, retry)
			}
			cur = append(cur, ";t="...)
			cur = strconv.AppendInt(cur, t, 10)
		}
		h["Ratelimit-Policy"] = append(h["Ratelimit-Policy"], pol)
		if d.Allowed {
			h["Ratelimit"] = append(h["Ratelimit"], string(cur))
		} else {
			// A 429 lists only what refused it: an outer limiter's members
			// go, or their t could outlast Retry-After.
			h["Ratelimit"] = []string{string(cur)}
		}
	}
	if !rl.cfg.DisableLegacyHeaders {
		h["X-Ratelimit-Limit"] = []string{strconv.FormatInt(d.Limit, 10)}
		h["X-Ratelimit-Remaining"] = []string{strconv.FormatInt(d.Remaining, 10)}
		h["X-Ratelimit-Reset"] = []string{strconv.FormatInt(rl.l.b.clock.Now().Add(d.Reset).Add(time.Second-1).Unix(), 10)}
	}
	if !d.Allowed && !rl.cfg.DisableRetryAfter {
		h.Set(echo.HeaderRetryAfter, strconv.FormatInt(max(1, retry), 10))
	}
}

// policyHeader returns the RateLimit-Policy field of pols.
func policyHeader(pds []PolicyDecision) string {
	var pol []byte
	for _, pd := range pds {
		if len(pol) > 0 {
			pol = append(pol, ", "...)
		}
		q, w := advertised(pd.Policy)
		pol = appendSFString(pol, pd.Policy.Name)
		pol = append(pol, ";q="...)
		pol = strconv.AppendInt(pol, q, 10)
		pol = append(pol, ";w="...)
		pol = strconv.AppendInt(pol, w, 10)
	}
	return string(pol)
}

// advertised returns a policy's quota q over w whole seconds for the
// RateLimit-Policy field.
func advertised(p Policy) (q, w int64) {
	quota, period := float64(p.Limit), float64(p.Window)
	if p.Algorithm == TokenBucket {
		quota, period = float64(p.Burst), float64(p.Window)*float64(p.Burst)/float64(p.Limit)
	}
	w = max(1, int64(math.Ceil(period/float64(time.Second))))
	if float64(w*int64(time.Second)) == period {
		return int64(quota), w
	}
	return int64(quota * float64(w) * float64(time.Second) / period), w
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
