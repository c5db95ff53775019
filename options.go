package redisecho

import (
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/gob"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// DefaultTimeout bounds every Redis call the library makes when a feature's
// Timeout option is zero. rueidis calls can hang without a deadline (a paused
// server, a half-open connection), so none is ever sent without one.
const DefaultTimeout = 500 * time.Millisecond

// Configuration errors. ToMiddleware (and every constructor that validates)
// returns them wrapped with the offending value; XWithConfig panics with them.
var (
	// ErrNilClient is returned when a feature is given no rueidis client.
	ErrNilClient = errors.New("redisecho: rueidis client is nil")
	// ErrClientNotComparable is returned for a rueidis.Client of a type
	// that cannot be compared (a struct wrapping a client together with a
	// func, say): the library keeps per-client state (the shared breaker,
	// the slot map) keyed by the client. Pass a pointer to such a wrapper.
	ErrClientNotComparable = errors.New("redisecho: the rueidis client's type is not comparable")
	// ErrInvalidTimeout is returned for a negative timeout or interval.
	ErrInvalidTimeout = errors.New("redisecho: timeout must not be negative")
	// ErrInvalidBreaker is returned for a BreakerConfig with negative values.
	ErrInvalidBreaker = errors.New("redisecho: invalid breaker configuration")
)

// ErrBreakerOpen is returned by Redis calls that the circuit breaker refused
// to send because Redis failed repeatedly. Each feature decides what it means
// for a request (the cache bypasses, the limiter applies its fail policy,
// sessions answer 503).
var ErrBreakerOpen = errors.New("redisecho: circuit breaker open, Redis call not sent")

// must is the XWithConfig half of Echo's grid: ToMiddleware's result, or a
// panic with its configuration error.
func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// Clock tells the time to logic that tests must be able to move (breaker
// cool-downs, session idle timeouts). Logic that several instances must agree
// on (rate-limit windows) uses Redis TIME instead.
type Clock interface {
	Now() time.Time
}

// SystemClock is the Clock used when a feature's Clock option is nil.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// Options is the plumbing every feature shares. Each feature's Config embeds
// it, so the fields below read the same everywhere:
//
//	redisecho.SessionConfig{Options: redisecho.Options{Timeout: time.Second}}
type Options struct {
	// Prefix is the namespace of every key the feature writes. It must not
	// contain '{' or '}'. Default: DefaultPrefix ("redisecho:").
	Prefix string
	// Timeout is the deadline of every Redis call the feature makes, applied
	// on top of the request's own context. Default: DefaultTimeout (500 ms).
	Timeout time.Duration
	// Breaker guards the feature's Redis calls. Default: the breaker that
	// every feature using the same client shares (see BreakerFor).
	Breaker *Breaker
	// Clock tells the time. Default: SystemClock.
	Clock Clock
	// Logger receives the errors a feature handles rather than returns (a
	// cache bypassed because Redis failed, say), at most once per second per
	// feature, with the number of repeats it left out. Default: slog.Default().
	Logger *slog.Logger
	// Observer receives the feature's events (see Observer); combine
	// several with Observers. Default: nil, no events and no cost.
	Observer Observer
}

// Observer receives what the library's features do, as Observations: the hook
// that metrics (the OpenTelemetry bridge module, github.com/redisecho/
// redisecho/otel) and the dashboard read. Observe is called synchronously
// on the request's or worker's goroutine, often concurrently, so it must be
// cheap, safe for concurrent use and must not block; it must not keep e
// past the call. An Observation is passed by value and carries no pointer that
// reaches user data, so observing allocates nothing.
//
// Every attribute an Observation carries has a bounded number of values: a Kind,
// a Result and a Path from fixed lists, and a Name that is a configured
// name (a limiter policy, a queue), a feature's name or a Redis node's
// address. Never a user ID, session ID, cache key, job ID or URL.
//
// An Observer may also implement Tracer (spans for job attempts, cache
// fills and session saves) and StateObserver (gauges read on demand).
type Observer interface {
	Observe(e Observation)
}

// ObserverFunc adapts a function to an Observer.
type ObserverFunc func(e Observation)

// Observe calls f(e).
func (f ObserverFunc) Observe(e Observation) { f(e) }

// Observation is one thing a feature did. Which fields are set depends on Kind;
// see each ObsKind.
type Observation struct {
	// Kind says what happened.
	Kind ObsKind
	// Result is the outcome, for the kinds that have one.
	Result Result
	// Path says how a rate-limit decision was made (ObsLimitDecision).
	Path Path
	// Name is the low-cardinality name the event belongs to: the limiter's
	// policy, the queue, the feature of a Redis call, the breaker scope.
	Name string
	// Group is the configured name of the feature instance, where the
	// kind has one: the limiter's Name (LimiterConfig.Name) for
	// ObsLimitDecision, so that two limiters with like-named policies are
	// told apart.
	Group string
	// N is how many things the event counts, at least 1 (a fan-out that
	// delivered one event to 40 clients is one Observation with N = 40).
	N int64
	// Size is a size in bytes (ObsCacheFill: the stored entry).
	Size int64
	// Duration is a duration (a Redis call, a job's run, a pickup latency).
	Duration time.Duration
}

// ObsKind says what an Observation reports.
type ObsKind uint8

// The kinds of Observation. Each says which fields it sets besides Kind and N.
const (
	obsNone ObsKind = iota

	// ObsSessionLoad is a session read, by the middleware (native or
	// Express mode) or the gorilla store. Reads are lazy: a request whose
	// handler never uses its session reports none. Result: ResultMemory
	// (served from process memory, client-side caching), ResultRedis (a
	// round trip), ResultNew (no cookie, or no session behind it) or
	// ResultInvalid (cookies that all failed their signature or format
	// check: a new session was started).
	ObsSessionLoad
	// ObsSessionSave is a session write: a save, a login's, a regeneration
	// or a touch (the idle-timeout extension a read may write). Result:
	// ResultOK or ResultError. A value refused as too large (413) is
	// neither.
	ObsSessionSave
	// ObsSessionStaleBypass is a read whose cached copy was older than
	// the client's cookie, so it went to Redis (read-your-writes).
	ObsSessionStaleBypass
	// ObsSessionError is a session read that Redis failed (the request
	// answered 503, or went on without a session where the policy says
	// so); not one whose client had already gone. It is no ObsSessionLoad.
	ObsSessionError

	// ObsCacheRequest is one request the response cache answered, or one
	// read of a cache store (Get, Remember). Result: ResultHit,
	// ResultStale (a stale entry served; the middleware and Remember
	// refresh it in the background), ResultMiss (no usable entry: this
	// request computed the value, or waited for another fill of it, which
	// is also an ObsCacheWait), ResultBypass (not looked up: a method,
	// header or Skipper said so, or Redis failed or the breaker is open)
	// or ResultUncacheable (looked up, missed, and the response could not
	// be stored: a status, size, Cache-Control, Set-Cookie or error said
	// no).
	ObsCacheRequest
	// ObsCacheFill is a value computed and stored by this instance (a
	// Set included). Size: the stored entry's bytes. Duration: compute and
	// store.
	ObsCacheFill
	// ObsCacheWait is a read that waited for another fill of its key,
	// here or on another instance (stampede protection).
	ObsCacheWait
	// ObsCacheInvalidation is an invalidation that removed something: a
	// Delete or Flush (N: the entries removed) or InvalidateTags (N: the
	// tags moved on).
	ObsCacheInvalidation

	// ObsLimitDecision is a rate-limit decision. Group: the limiter's
	// Name. Name: the binding policy's name (the one the RateLimit headers
	// describe; the first policy for a degraded decision). Result and
	// Path: ResultAllowed or ResultDenied with PathRedis (the script
	// decided) or PathLocal (a denial decided in process memory: the key
	// is known to be over its limit until its window ends); ResultAllowed
	// or ResultDenied with PathFallback (Redis failed and LocalFallback
	// decided in memory); ResultDegraded with PathNone (Redis failed and
	// FailOpen admitted or FailClosed refused).
	ObsLimitDecision

	// ObsStreamOpen and ObsStreamClose are an SSE stream opening and
	// closing: together, the connection gauge.
	ObsStreamOpen
	ObsStreamClose
	// ObsPublish is an event published to the hub (Publish, and the
	// event of a Disconnect).
	ObsPublish
	// ObsDeliver counts events queued to this instance's clients or
	// replayed to a resuming one. N: how many (one observation per
	// fan-out).
	ObsDeliver
	// ObsDropSlow is a client disconnected for falling behind.
	ObsDropSlow
	// ObsResume is a stream that resumed at least one channel.
	ObsResume
	// ObsReset is a reset event sent to a client (its position was lost),
	// one per event whatever the channels it names.
	ObsReset

	// The job events. Name: the queue. ObsJobStarted's Duration is the
	// pickup latency (from the time the job became due to its start);
	// ObsJobCompleted's and ObsJobFailed's is the attempt's run time.
	// A failed attempt is then ObsJobRetried or ObsJobDead.
	ObsJobEnqueued
	ObsJobStarted
	ObsJobCompleted
	ObsJobFailed
	ObsJobRetried
	ObsJobDead
	ObsJobReaped
	ObsJobLeaseLost

	// ObsRedisCall is a Redis round trip (one command, pipeline or
	// script; never a client-side cache hit, nor a blocking wait). Name:
	// the feature. Result: ResultOK, or ResultError (a failure that counts
	// against Redis: a timeout, a network error, a server that cannot
	// serve). Duration: the round trip.
	ObsRedisCall
	// ObsBreakerChange is a breaker scope changing state. Name: the
	// scope (a node's address, "redis" or "cluster"). Result: the new
	// state, ResultClosed, ResultOpen or ResultHalfOpen.
	ObsBreakerChange

	obsKinds // the number of kinds
)

// NumObsKinds is one more than the largest ObsKind, for observers that
// index arrays by kind.
const NumObsKinds = int(obsKinds)

var obsKindNames = [...]string{
	obsNone: "none", ObsSessionLoad: "session.load", ObsSessionSave: "session.save",
	ObsSessionStaleBypass: "session.stale_bypass", ObsSessionError: "session.error",
	ObsCacheRequest: "cache.request", ObsCacheFill: "cache.fill", ObsCacheWait: "cache.wait",
	ObsCacheInvalidation: "cache.invalidation", ObsLimitDecision: "ratelimit.decision",
	ObsStreamOpen: "realtime.open", ObsStreamClose: "realtime.close", ObsPublish: "realtime.publish",
	ObsDeliver: "realtime.deliver", ObsDropSlow: "realtime.drop_slow", ObsResume: "realtime.resume",
	ObsReset: "realtime.reset", ObsJobEnqueued: "job.enqueued", ObsJobStarted: "job.started",
	ObsJobCompleted: "job.completed", ObsJobFailed: "job.failed", ObsJobRetried: "job.retried",
	ObsJobDead: "job.dead", ObsJobReaped: "job.reaped", ObsJobLeaseLost: "job.lease_lost",
	ObsRedisCall: "redis.call", ObsBreakerChange: "redis.breaker",
}

// String returns the kind's name, e.g. "cache.request".
func (k ObsKind) String() string {
	if int(k) < len(obsKindNames) {
		return obsKindNames[k]
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Result is the outcome an Observation reports.
type Result uint8

// The results. Each ObsKind says which it uses.
const (
	ResultNone Result = iota
	ResultOK
	ResultError
	ResultMemory
	ResultRedis
	ResultNew
	ResultInvalid
	ResultHit
	ResultMiss
	ResultStale
	ResultBypass
	ResultUncacheable
	ResultAllowed
	ResultDenied
	ResultDegraded
	ResultClosed
	ResultOpen
	ResultHalfOpen

	results // the number of results
)

// NumResults is one more than the largest Result.
const NumResults = int(results)

var resultNames = [...]string{
	ResultNone: "", ResultOK: "ok", ResultError: "error", ResultMemory: "memory", ResultRedis: "redis",
	ResultNew: "new", ResultInvalid: "invalid", ResultHit: "hit", ResultMiss: "miss", ResultStale: "stale",
	ResultBypass: "bypass", ResultUncacheable: "uncacheable", ResultAllowed: "allowed", ResultDenied: "denied",
	ResultDegraded: "degraded", ResultClosed: "closed", ResultOpen: "open", ResultHalfOpen: "half-open",
}

// String returns the result's name, e.g. "hit"; "" for ResultNone.
func (r Result) String() string {
	if int(r) < len(resultNames) {
		return resultNames[r]
	}
	return "result(" + strconv.Itoa(int(r)) + ")"
}

// Path says how a rate-limit decision was made.
type Path uint8

// The paths of a rate-limit decision.
const (
	PathNone Path = iota
	// PathRedis: decided by a script in Redis.
	PathRedis
	// PathLocal: decided in process memory, no round trip (a key already
	// known to be over its limit until its window ends).
	PathLocal
	// PathFallback: decided by the fallback limiter while Redis was
	// unavailable.
	PathFallback

	paths
)

// NumPaths is one more than the largest Path.
const NumPaths = int(paths)

// String returns "redis", "local", "fallback", or "" for PathNone.
func (p Path) String() string {
	switch p {
	case PathRedis:
		return "redis"
	case PathLocal:
		return "local"
	case PathFallback:
		return "fallback"
	case PathNone:
		return ""
	}
	return "path(" + strconv.Itoa(int(p)) + ")"
}

// Tracer is an Observer that also records spans. The library starts one for
// each job attempt (linked to the span of the request that enqueued the
// job), each cache fill and each session write (a touch included); never
// for a cache hit or a session read that writes nothing. A plain Observer that does not implement it costs nothing
// here.
type Tracer interface {
	// StartSpan starts a span under ctx's span and returns the context
	// that carries it, and the function that ends it with the operation's
	// error (nil for success).
	StartSpan(ctx context.Context, s Span) (context.Context, func(err error))
	// InjectTrace returns ctx's trace context as text (W3C traceparent, or
	// whatever the tracer's propagator writes) to be stored with a job, or
	// "" when there is none. At most 1 KiB is stored; longer text is
	// dropped.
	InjectTrace(ctx context.Context) string
}

// Span describes a span the library starts through a Tracer.
type Span struct {
	// Op is the operation: SpanJobAttempt, SpanCacheFill or SpanSessionSave.
	Op SpanOp
	// Name is the low-cardinality name of what the span works on: the
	// queue for a job, the cache store's prefix for a fill, "" for a save.
	Name string
	// JobType, JobID and Attempt describe a job attempt.
	JobType, JobID string
	Attempt        int
	// Link is the trace context the job was enqueued under (InjectTrace's
	// text), "" for none: a job attempt's span is linked to it.
	Link string
}

// SpanOp is the operation a Span records.
type SpanOp uint8

// The operations the library records as spans.
const (
	SpanJobAttempt SpanOp = iota + 1
	SpanCacheFill
	SpanSessionSave
)

// String returns "job.attempt", "cache.fill" or "session.save".
func (o SpanOp) String() string {
	switch o {
	case SpanJobAttempt:
		return "job.attempt"
	case SpanCacheFill:
		return "cache.fill"
	case SpanSessionSave:
		return "session.save"
	}
	return "span(" + strconv.Itoa(int(o)) + ")"
}

// StateObserver is an Observer that also reads state on demand, for gauges:
// the library hands it every Breaker and Queue its features use (a Queue
// once per queue name: the last one built wins), when the feature is built.
// The calls do no I/O; what the observer later reads (Breaker.Stats,
// Queue.Counts with a deadline) is its own business.
type StateObserver interface {
	ObserveBreaker(b *Breaker)
	ObserveQueue(q *Queue)
}

// Observers returns an Observer that hands every event to each of obs in
// turn, nil entries left out: nil when none is left, the one itself when
// one is. It implements Tracer when one of obs does (the first such one
// records the spans) and StateObserver, passing the calls to those of obs
// that implement it.
func Observers(obs ...Observer) Observer {
	var list multiObserver
	for _, o := range obs {
		switch o := o.(type) {
		case nil:
		case multiObserver:
			list = append(list, o...)
		default:
			list = append(list, o)
		}
	}
	switch len(list) {
	case 0:
		return nil
	case 1:
		return list[0]
	}
	for _, o := range list {
		if t, ok := o.(Tracer); ok {
			return tracingMulti{list, t}
		}
	}
	return list
}

type multiObserver []Observer

func (m multiObserver) Observe(e Observation) {
	for _, o := range m {
		o.Observe(e)
	}
}

func (m multiObserver) ObserveBreaker(b *Breaker) {
	for _, o := range m {
		if s, ok := o.(StateObserver); ok {
			s.ObserveBreaker(b)
		}
	}
}

func (m multiObserver) ObserveQueue(q *Queue) {
	for _, o := range m {
		if s, ok := o.(StateObserver); ok {
			s.ObserveQueue(q)
		}
	}
}

type tracingMulti struct {
	multiObserver
	Tracer
}

// startSpan starts a span through the tracer when there is one; the
// returned end is never nil.
func (b *backend) startSpan(ctx context.Context, s Span) (context.Context, func(error)) {
	if b.tracer == nil {
		return ctx, noEnd
	}
	return b.tracer.StartSpan(ctx, s)
}

func noEnd(error) {}

// obsFeatures names each feature in ObsRedisCall (Observation.Name).
var obsFeatures = map[string]string{
	"session": "session", "cache": "cache", "rate limit": "ratelimit", "realtime": "realtime", "queue": "jobs",
}

// observe hands e to o when there is one. Call sites that build an Observation
// with work of their own check b.obs != nil first.
func (b *backend) observe(e Observation) {
	if b.obs != nil {
		b.obs.Observe(e)
	}
}

// Codec encodes values: session values (each on its own, so one request can
// change one value without rewriting the others) and cache service values.
type Codec interface {
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// JSONCodec is the default Codec: encoding/json.
type JSONCodec struct{}

// Marshal encodes v as JSON.
func (JSONCodec) Marshal(v any) ([]byte, error) { return json.Marshal(v) }

// Unmarshal decodes JSON data into v. Plain strings, integers and booleans
// into *string, *int, *int64 and *bool take a fast path with the same result
// as encoding/json.
func (JSONCodec) Unmarshal(data []byte, v any) error {
	switch p := v.(type) {
	case *string:
		if s, ok := plainJSONString(data); ok {
			*p = s
			return nil
		}
	case *int:
		if n, err := strconv.ParseInt(string(data), 10, strconv.IntSize); err == nil && plainJSONInt(data) {
			*p = int(n)
			return nil
		}
	case *int64:
		if n, err := strconv.ParseInt(string(data), 10, 64); err == nil && plainJSONInt(data) {
			*p = n
			return nil
		}
	case *bool:
		switch string(data) {
		case "true":
			*p = true
			return nil
		case "false":
			*p = false
			return nil
		}
	}
	return json.Unmarshal(data, v)
}

// plainJSONString decodes a JSON string with no escapes and no bytes that
// encoding/json would treat specially (controls, non-ASCII).
func plainJSONString(data []byte) (string, bool) {
	if len(data) < 2 || data[0] != '"' || data[len(data)-1] != '"' {
		return "", false
	}
	for _, c := range data[1 : len(data)-1] {
		if c < 0x20 || c == '"' || c == '\\' || c >= 0x80 {
			return "", false
		}
	}
	return string(data[1 : len(data)-1]), true
}

// plainJSONInt reports whether data is a JSON integer as encoding/json
// writes it: an optional minus and digits without a leading zero or plus.
func plainJSONInt(data []byte) bool {
	d := data
	if len(d) > 0 && d[0] == '-' {
		d = d[1:]
	}
	return len(d) > 0 && (d[0] != '0' || len(d) == 1) && d[0] != '+'
}

// GobCodec encodes values with encoding/gob, keeping their Go types through
// an interface (register custom types with gob.Register). The gorilla store
// uses it so that sess.Values["userId"].(int) survives a reload.
type GobCodec struct{}

// Marshal encodes v, as an interface value, with gob.
func (GobCodec) Marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	if err := gob.NewEncoder(&b).Encode(&v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Unmarshal decodes data into v, which must be a non-nil pointer to the
// encoded value's type or to an interface it implements (such as *any).
func (GobCodec) Unmarshal(data []byte, v any) error {
	var x any
	if err := gob.NewDecoder(bytes.NewReader(data)).Decode(&x); err != nil {
		return err
	}
	dst := reflect.ValueOf(v)
	if dst.Kind() != reflect.Pointer || dst.IsNil() {
		return fmt.Errorf("redisecho: gob: cannot decode into %T", v)
	}
	if x == nil {
		dst.Elem().SetZero()
		return nil
	}
	src := reflect.ValueOf(x)
	if !src.Type().AssignableTo(dst.Elem().Type()) {
		return fmt.Errorf("redisecho: gob: cannot decode %T into %T", x, v)
	}
	dst.Elem().Set(src)
	return nil
}

// backend is a feature's way to Redis: the client with the options applied.
// Every call gets the deadline, goes through the breaker of the node that
// holds its key, and never panics on a Redis error.
type backend struct {
	client  rueidis.Client
	shared  *clientState
	keys    Keyspace
	timeout time.Duration
	breaker *Breaker
	clock   Clock
	log     *rateLog
	obs     Observer // nil: no events
	tracer  Tracer   // obs, when it traces; nil otherwise
	feature string

	deadline sharedDeadline
}

// newBackend validates o and fills its defaults. It does no I/O.
func newBackend(feature string, client rueidis.Client, o Options) (*backend, error) {
	if client == nil {
		return nil, fmt.Errorf("%s: %w", feature, ErrNilClient)
	}
	if !clientComparable(client) {
		return nil, fmt.Errorf("%s: %w: %T (pass a pointer to it)", feature, ErrClientNotComparable, client)
	}
	keys, err := NewKeyspace(o.Prefix)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", feature, err)
	}
	if o.Timeout < 0 {
		return nil, fmt.Errorf("%s: %w: %v", feature, ErrInvalidTimeout, o.Timeout)
	}
	if o.Timeout == 0 {
		o.Timeout = DefaultTimeout
	}
	if o.Clock == nil {
		o.Clock = SystemClock{}
	}
	st := stateOf(client)
	if o.Breaker == nil {
		o.Breaker = st.breaker
	}
	o.Breaker.adopt(o.Logger, o.Observer)
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	b := &backend{
		client:  client,
		shared:  st,
		keys:    keys,
		timeout: o.Timeout,
		breaker: o.Breaker,
		clock:   o.Clock,
		log:     &rateLog{logger: o.Logger.With("component", "redisecho", "feature", feature), clock: o.Clock},
		obs:     o.Observer,
		feature: obsFeatures[feature],
	}
	b.tracer, _ = o.Observer.(Tracer)
	if so, ok := o.Observer.(StateObserver); ok {
		so.ObserveBreaker(o.Breaker)
	}
	return b, nil
}

// scope returns the breaker scope of key: the address of the master that
// holds its slot on a cluster, "redis" otherwise.
func (b *backend) scope(key string) string {
	return b.shared.nodeOf(b.client, key, b.timeout)
}

// call runs fn with the deadline, under the breaker of key's node. grows
// tells whether the call sends a command that Redis refuses when full (see
// refusedWhenFull): its success proves the node has memory again.
func (b *backend) call(ctx context.Context, key string, grows bool, fn func(ctx context.Context) error) error {
	return b.callWithin(ctx, key, b.timeout, grows, fn)
}

// callWithin is call with a deadline of its own instead of Timeout.
func (b *backend) callWithin(ctx context.Context, key string, timeout time.Duration, grows bool, fn func(ctx context.Context) error) error {
	b.shared.checkCache(b.client, b.log, b.timeout)
	n := b.breaker.node(b.scope(key))
	if !b.breaker.allow(n) {
		n.rejected.Add(1)
		return ErrBreakerOpen
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	var start time.Time
	if b.obs != nil && timeout == b.timeout { // a blocking wait is not a round trip's duration
		start = time.Now()
	}
	err := fn(cctx)
	cancel()
	o := b.record(n, ctx, err, grows)
	if !start.IsZero() {
		b.observeCall(start, o)
	}
	return err
}

// observeCall reports a round trip that started at start (ObsRedisCall).
func (b *backend) observeCall(start time.Time, o outcome) {
	if o == unknown {
		return // the caller gave up: neither a duration nor an error of Redis's
	}
	r := ResultOK
	if o == unhealthy {
		r = ResultError
	}
	b.obs.Observe(Observation{Kind: ObsRedisCall, Result: r, Name: b.feature, N: 1, Duration: time.Since(start)})
}

// record tells the breaker a call's outcome and keeps the node's OOM state:
// an OOM reply sets it (and counts as an answer, not a failure), a command
// that Redis refuses when full clears it by succeeding (grows). A DEL or an
// HDEL succeeds in a full Redis, so it proves nothing. A failure on a
// cluster also re-reads the slot map (at most once a second), so that after
// a failover the keys of a dead master map to its replacement, not to the
// dead scope.
func (b *backend) record(n *breakerNode, ctx context.Context, err error, grows bool) outcome {
	o := classify(ctx, err)
	b.breaker.record(n, o)
	switch {
	case o == unhealthy && b.client.Mode() == rueidis.ClientModeCluster:
		b.shared.refreshSlots(b.client, b.timeout)
	case isOOM(err):
		n.markOOM(b.breaker.clock.Now())
	case err == nil && grows:
		n.clearOOM()
	}
	return o
}

// isOOM reports whether err is Redis's "OOM command not allowed when used
// memory > 'maxmemory'" reply: the server answers, but refuses writes (and,
// on Redis 7.0, any command queued in MULTI, which is how rueidis sends a
// client-side-cached read that misses).
func isOOM(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && strings.HasPrefix(re.Error(), "OOM")
}

// refusedWhenFull reports whether cmd is one of the common commands that
// Redis refuses with OOM when maxmemory is reached (their "denyoom" flag):
// the ones that grow memory. Deletes, expiries and renames are not.
func refusedWhenFull(cmd rueidis.Completed) bool {
	cs := cmd.Commands()
	if len(cs) == 0 {
		return false
	}
	_, ok := denyOOM[strings.ToUpper(cs[0])]
	return ok
}

var denyOOM = map[string]struct{}{
	"SET": {}, "SETNX": {}, "SETEX": {}, "PSETEX": {}, "MSET": {}, "MSETNX": {}, "GETSET": {},
	"APPEND": {}, "SETRANGE": {}, "INCR": {}, "INCRBY": {}, "INCRBYFLOAT": {}, "DECR": {}, "DECRBY": {},
	"HSET": {}, "HSETNX": {}, "HMSET": {}, "HINCRBY": {}, "HINCRBYFLOAT": {},
	"LPUSH": {}, "RPUSH": {}, "LPUSHX": {}, "RPUSHX": {}, "LINSERT": {}, "LSET": {},
	"SADD": {}, "ZADD": {}, "ZINCRBY": {}, "XADD": {}, "PFADD": {}, "SETBIT": {}, "COPY": {}, "RESTORE": {},
}

// oomHold is how long a node stays marked out of memory after its last OOM
// reply (or readiness probe that found it full), unless a command that
// Redis refuses when full succeeds first. While marked, cached reads of its
// keys go untracked straight away (a tracked miss would fail), and readiness
// reports "oom".
const oomHold = 2 * time.Second

// OOM reports whether key's node is marked out of memory (see
// BreakerStats.OOM).
func (b *backend) OOM(key string) bool {
	return b.breaker.node(b.scope(key)).isOOM(b.breaker.clock.Now())
}

// Do sends cmd, whose key (or first key) is key.
func (b *backend) Do(ctx context.Context, key string, cmd rueidis.Completed) (res rueidis.RedisResult) {
	err := b.call(ctx, key, refusedWhenFull(cmd), func(ctx context.Context) error {
		res = b.client.Do(ctx, cmd)
		return res.Error()
	})
	if errors.Is(err, ErrBreakerOpen) {
		return rueidis.NewErrorResult(err)
	}
	return res
}

// blockingGrace is how long DoBlocking waits past the server timeout of its
// command (on top of Timeout) before it gives up on the reply.
const blockingGrace = 250 * time.Millisecond

// DoBlocking sends cmd, a blocking command whose key (or first key) is key,
// and waits for its reply: an element, or a nil reply when the command's
// own server timeout passes with nothing to pop. The job worker blocks this
// way (BZPOPMIN on a queue's marker key) instead of polling.
//
// cmd must be one of BZPOPMIN, BZPOPMAX, BLPOP, BRPOP, BLMOVE, BRPOPLPUSH,
// BZMPOP, BLMPOP, or XREAD/XREADGROUP with BLOCK, built with the rueidis
// builder (or Arbitrary(...).Blocking()), so that rueidis marks it as
// blocking; and its timeout argument must equal serverTimeout (seconds as a
// float, or BLOCK milliseconds for XREAD), which must be at least 1 ms
// (Redis reads 0 as "block forever"). Any other command is refused: an
// error result, nothing sent.
//
// DoBlocking marks cmd UnblockOnCancel and ToPipe, whatever the caller
// built. rueidis then sends it on a connection of the node's blocking pool
// (BlockingPoolSize), never on the shared auto-pipelined connections, and
// when ctx ends before the reply it sends CLIENT UNBLOCK and keeps the
// connection instead of closing it. ToPipe is what keeps both true under
// ClientOption.DisableAutoPipelining: without it such a client sends a
// blocking command on a connection that cannot be unblocked, and closes it
// on cancel. (CLIENT UNBLOCK needs Redis 6 and the ACL right to run it;
// without them a cancel closes the connection, which rueidis redials.)
//
// The call's deadline is serverTimeout + 250 ms + Timeout, so a reply that
// the server sends at its timeout always arrives in time. Outcomes, for the
// breaker of key's node:
//   - a reply, the nil reply of the server timeout included: success, so an
//     idle worker blocked for hours keeps the breaker closed;
//   - ctx cancelled or past its own deadline (the worker stops waiting):
//     not counted, it says nothing about Redis;
//   - DoBlocking's own deadline passing (a hung server or network): a
//     failure, like any other network error;
//   - breaker open: an ErrBreakerOpen result, nothing sent.
func (b *backend) DoBlocking(ctx context.Context, key string, cmd rueidis.Completed, serverTimeout time.Duration) (res rueidis.RedisResult) {
	if err := checkBlocking(cmd, serverTimeout); err != nil {
		return rueidis.NewErrorResult(err)
	}
	cmd = cmd.ToPipe().UnblockOnCancel()
	err := b.callWithin(ctx, key, serverTimeout+blockingGrace+b.timeout, false, func(ctx context.Context) error {
		res = b.client.Do(ctx, cmd)
		return res.Error()
	})
	if errors.Is(err, ErrBreakerOpen) {
		return rueidis.NewErrorResult(err)
	}
	return res
}

// errNotBlocking is DoBlocking's refusal of a command it cannot send.
var errNotBlocking = errors.New("redisecho: DoBlocking")

// checkBlocking reports why DoBlocking must not send cmd with serverTimeout,
// or nil.
func checkBlocking(cmd rueidis.Completed, serverTimeout time.Duration) error {
	if serverTimeout < time.Millisecond {
		return fmt.Errorf("%w: server timeout %v is below 1 ms (Redis reads 0 as forever)", errNotBlocking, serverTimeout)
	}
	cs := cmd.Commands()
	if len(cs) == 0 {
		return fmt.Errorf("%w: empty command", errNotBlocking)
	}
	name := strings.ToUpper(cs[0])
	arg, unit, err := blockingTimeoutArg(name, cs)
	if err != nil {
		return err
	}
	if !cmd.IsBlock() {
		return fmt.Errorf("%w: %s is not marked blocking (build it with the rueidis builder or Arbitrary(...).Blocking())", errNotBlocking, name)
	}
	f, err := strconv.ParseFloat(arg, 64)
	if err != nil || f <= 0 {
		return fmt.Errorf("%w: %s timeout %q is not a positive number", errNotBlocking, name, arg)
	}
	got := time.Duration(f * float64(unit))
	if d := got - serverTimeout; d <= -time.Millisecond || d >= time.Millisecond {
		return fmt.Errorf("%w: %s timeout %s (%v) does not match the server timeout %v", errNotBlocking, name, arg, got, serverTimeout)
	}
	return nil
}

// blockingTimeoutArg returns the timeout argument of the blocking command
// cs (named name) and its unit.
func blockingTimeoutArg(name string, cs []string) (string, time.Duration, error) {
	switch name {
	case "BZPOPMIN", "BZPOPMAX", "BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH": // ... timeout
		if len(cs) >= 3 {
			return cs[len(cs)-1], time.Second, nil
		}
	case "BZMPOP", "BLMPOP": // timeout numkeys key ... MIN|MAX|LEFT|RIGHT [COUNT n]
		if len(cs) >= 4 {
			return cs[1], time.Second, nil
		}
	case "XREAD", "XREADGROUP": // [GROUP g c] [COUNT n] [BLOCK ms] [NOACK] STREAMS ...
		i := 1
		if name == "XREADGROUP" {
			i = 4 // GROUP group consumer
		}
		for ; i < len(cs); i++ {
			switch strings.ToUpper(cs[i]) {
			case "COUNT":
				i++
			case "BLOCK":
				if i+1 < len(cs) {
					return cs[i+1], time.Millisecond, nil
				}
			case "STREAMS":
				return "", 0, fmt.Errorf("%w: %s without BLOCK does not block", errNotBlocking, name)
			}
		}
	default:
		return "", 0, fmt.Errorf("%w: %s is not a blocking command", errNotBlocking, name)
	}
	return "", 0, fmt.Errorf("%w: %s has too few arguments", errNotBlocking, name)
}

// DoCache sends cmd through client-side caching, whose key is key. cmd must
// be pinned (.Pin()): rueidis v1.0.79 recycles a cacheable command that
// failed with ErrDoCacheAborted while its connection's writer may still read
// it (a data race under connection kills); a pinned command is never
// recycled, and can be built once and shared by concurrent calls.
//
// Most DoCache calls are hits served from process memory, which need no
// deadline, so DoCache does not pay for a context.WithTimeout per call: it
// runs under a deadline context shared by the calls of the same ~1/50 of
// Timeout, so a miss still waits at most Timeout. The price: a miss does not
// end early when the caller gives up, only at that deadline.
//
// A hit says nothing about Redis's health, so it is not reported to the
// breaker (a hit must not close a half-open scope); so while the scope is
// not closed, DoCache reads untracked, and the half-open probe is a real
// round trip whose outcome closes or reopens the scope. Under OOM, Redis 7.0
// refuses the MULTI that a tracked miss is sent in: DoCache then reads
// untracked with a plain round trip, and keeps doing so while the node is
// marked out of memory, so reads keep working in a full Redis.
func (b *backend) DoCache(ctx context.Context, key string, cmd rueidis.Cacheable, ttl time.Duration) (res rueidis.RedisResult) {
	b.shared.checkCache(b.client, b.log, b.timeout)
	n := b.breaker.node(b.scope(key))
	if !b.breaker.allow(n) {
		n.rejected.Add(1)
		return rueidis.NewErrorResult(ErrBreakerOpen)
	}
	now := b.breaker.clock.Now()
	var start time.Time
	if b.obs != nil {
		start = time.Now()
	}
	if !n.isOOM(now) && n.closed() {
		res = b.client.DoCache(b.deadline.get(b.timeout), cmd, ttl)
		if res.IsCacheHit() {
			return res
		}
		err := res.Error()
		if !isOOM(err) {
			b.recordCall(n, ctx, err, start)
			return res
		}
		n.markOOM(now)
	}
	res = b.client.Do(b.deadline.get(b.timeout), rueidis.Completed(cmd)) // untracked; cmd is pinned, so Do does not recycle it
	b.recordCall(n, ctx, res.Error(), start)
	return res
}

// recordCall is record for a read that cannot grow memory, reporting the
// round trip that started at start when there is an observer.
func (b *backend) recordCall(n *breakerNode, ctx context.Context, err error, start time.Time) {
	o := b.record(n, ctx, err, false)
	if b.obs != nil {
		b.observeCall(start, o)
	}
}

// DoMultiCache sends cmds through client-side caching under one deadline,
// like DoCache. The breaker scope is key's node; the commands may live on
// other nodes (rueidis routes each by its own key).
func (b *backend) DoMultiCache(ctx context.Context, key string, cmds ...rueidis.CacheableTTL) []rueidis.RedisResult {
	b.shared.checkCache(b.client, b.log, b.timeout)
	n := b.breaker.node(b.scope(key))
	if !b.breaker.allow(n) {
		n.rejected.Add(1)
		res := make([]rueidis.RedisResult, len(cmds))
		for i := range res {
			res[i] = rueidis.NewErrorResult(ErrBreakerOpen)
		}
		return res
	}
	for i := range cmds {
		cmds[i].Cmd = cmds[i].Cmd.Pin() // see DoCache
	}
	now := b.breaker.clock.Now()
	var start time.Time
	if b.obs != nil {
		start = time.Now()
	}
	var res []rueidis.RedisResult
	if !n.isOOM(now) && n.closed() {
		res = b.client.DoMultiCache(b.deadline.get(b.timeout), cmds...)
		hits, err := multiErr(res)
		if !isOOM(err) {
			if hits < len(res) {
				b.recordCall(n, ctx, err, start)
			}
			return res
		}
		n.markOOM(now)
	}
	plain := make([]rueidis.Completed, len(cmds))
	for i := range cmds {
		plain[i] = rueidis.Completed(cmds[i].Cmd) // untracked, see DoCache
	}
	res = b.client.DoMulti(b.deadline.get(b.timeout), plain...)
	_, err := multiErr(res)
	b.recordCall(n, ctx, err, start)
	return res
}

// multiErr returns how many replies of res were cache hits, and the first
// error that is not a nil reply.
func multiErr(res []rueidis.RedisResult) (hits int, err error) {
	for _, r := range res {
		if r.IsCacheHit() {
			hits++
		}
		if e := r.Error(); err == nil && e != nil && !rueidis.IsRedisNil(e) {
			err = e
		}
	}
	return hits, err
}

// sharedDeadline hands out a context whose deadline lies between 49/50 and
// 50/50 of a timeout from now, renewing it when it gets older than 1/50.
type sharedDeadline struct {
	cur atomic.Pointer[deadlineCtx]
}

type deadlineCtx struct {
	ctx context.Context
	// cancel is never called early: calls may still use ctx. Its timer
	// releases it at the deadline.
	cancel  context.CancelFunc
	renewAt int64 // unix nanos
}

func (d *sharedDeadline) get(timeout time.Duration) context.Context {
	now := time.Now().UnixNano()
	if c := d.cur.Load(); c != nil && now < c.renewAt {
		return c.ctx
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	d.cur.Store(&deadlineCtx{ctx: ctx, cancel: cancel, renewAt: now + int64(timeout/50)})
	return ctx
}

// DoMulti pipelines cmds, which must all live in key's slot.
func (b *backend) DoMulti(ctx context.Context, key string, cmds ...rueidis.Completed) (res []rueidis.RedisResult) {
	grows := false
	for i := range cmds {
		grows = grows || refusedWhenFull(cmds[i])
	}
	err := b.call(ctx, key, grows, func(ctx context.Context) error {
		res = b.client.DoMulti(ctx, cmds...)
		for _, r := range res {
			if err := r.Error(); err != nil && !rueidis.IsRedisNil(err) {
				return err
			}
		}
		return nil
	})
	if errors.Is(err, ErrBreakerOpen) {
		res = make([]rueidis.RedisResult, len(cmds))
		for i := range res {
			res[i] = rueidis.NewErrorResult(err)
		}
	}
	return res
}

// Exec runs script over keys (which must share a slot) with args.
func (b *backend) Exec(ctx context.Context, script *rueidis.Lua, keys, args []string) (res rueidis.RedisResult) {
	var first string
	if len(keys) > 0 {
		first = keys[0]
	}
	// A script that succeeds may have written nothing (a limiter's denial),
	// so it does not clear the node's OOM state; its OOM reply sets it.
	err := b.call(ctx, first, false, func(ctx context.Context) error {
		res = script.Exec(ctx, b.client, keys, args)
		return res.Error()
	})
	if errors.Is(err, ErrBreakerOpen) {
		return rueidis.NewErrorResult(err)
	}
	return res
}

// pipelinedScript is a Lua script that backend.ExecMulti can pipeline:
// its source and SHA-1. rueidis's own Lua.ExecMulti first sends SCRIPT LOAD
// to every node (replicas included) on every call, so one stalled node
// holds every batch, on every node, until the deadline.
type pipelinedScript struct {
	src, sha string
}

func newPipelinedScript(src string) *pipelinedScript {
	sum := sha1.Sum([]byte(src))
	return &pipelinedScript{src: src, sha: hex.EncodeToString(sum[:])}
}

// ExecMulti runs script once per exec in one pipeline (per node: rueidis
// splits it by slot), as EVALSHA, and as EVAL for the ones a node answers
// NOSCRIPT, under one deadline and the breaker of key's node: callers
// group execs by node (see scope) so that one failing node does not open
// another's breaker.
func (b *backend) ExecMulti(ctx context.Context, key string, script *pipelinedScript, execs ...rueidis.LuaExec) (res []rueidis.RedisResult) {
	err := b.call(ctx, key, false, func(ctx context.Context) error {
		cmds := make([]rueidis.Completed, len(execs))
		for i, e := range execs {
			cmds[i] = b.client.B().Evalsha().Sha1(script.sha).Numkeys(int64(len(e.Keys))).Key(e.Keys...).Arg(e.Args...).Build()
		}
		res = b.client.DoMulti(ctx, cmds...)
		var missing []int
		for i, r := range res {
			if re, ok := rueidis.IsRedisErr(r.Error()); ok && re.IsNoScript() {
				missing = append(missing, i)
			}
		}
		if len(missing) > 0 {
			evals := make([]rueidis.Completed, len(missing))
			for j, i := range missing {
				e := execs[i]
				evals[j] = b.client.B().Eval().Script(script.src).Numkeys(int64(len(e.Keys))).Key(e.Keys...).Arg(e.Args...).Build()
			}
			for j, r := range b.client.DoMulti(ctx, evals...) {
				res[missing[j]] = r
			}
		}
		_, err := multiErr(res)
		return err
	})
	if errors.Is(err, ErrBreakerOpen) {
		res = make([]rueidis.RedisResult, len(execs))
		for i := range res {
			res[i] = rueidis.NewErrorResult(err)
		}
	}
	return res
}

// outcome is what a call tells the breaker about Redis's health.
type outcome uint8

const (
	healthy   outcome = iota // Redis answered (even with an error reply)
	unhealthy                // timeout, network error, or Redis not serving
	unknown                  // the caller gave up: says nothing about Redis
)

// classify tells a Redis failure from a caller that gave up. parent is the
// caller's context, before the call's own deadline was added: when it is done
// (the HTTP client disconnected, the request timed out), the error is not
// Redis's fault and must not trip the breaker, or anyone could switch a
// feature off for everyone by disconnecting.
func classify(parent context.Context, err error) outcome {
	switch {
	case err == nil, rueidis.IsRedisNil(err):
		return healthy
	case parent.Err() != nil, errors.Is(err, context.Canceled):
		return unknown
	case errors.Is(err, context.DeadlineExceeded):
		return unhealthy
	}
	if re, ok := rueidis.IsRedisErr(err); ok {
		// Replies that mean the server cannot serve now count as failures;
		// any other error reply (WRONGTYPE, a script error) proves it is up.
		msg := re.Error()
		// An OOM reply is an answer: the node serves reads and refuses
		// writes, which the node's OOM state tracks instead.
		for _, p := range []string{"LOADING", "BUSY ", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY", "NOREPLICAS"} {
			if strings.HasPrefix(msg, p) {
				return unhealthy
			}
		}
		return healthy
	}
	return unhealthy
}

// BreakerState is the state of one breaker scope.
type BreakerState int32

// The states of a circuit breaker scope.
const (
	// BreakerClosed lets every call through.
	BreakerClosed BreakerState = iota
	// BreakerOpen refuses every call with ErrBreakerOpen until the cool-down
	// has passed.
	BreakerOpen
	// BreakerHalfOpen lets one probe call through; its outcome closes or
	// reopens the breaker.
	BreakerHalfOpen
)

// String returns "closed", "open" or "half-open".
func (s BreakerState) String() string {
	switch s {
	case BreakerOpen:
		return "open"
	case BreakerHalfOpen:
		return "half-open"
	default:
		return "closed"
	}
}

// BreakerConfig configures a Breaker.
type BreakerConfig struct {
	// Failures is the run of consecutive failed calls (timeouts, network
	// errors, LOADING/BUSY/CLUSTERDOWN-like replies) that opens a scope.
	// Calls the caller abandoned do not count. Default: 5.
	Failures int
	// Cooldown is how long an open scope refuses calls before it lets one
	// probe through. Default: 2 s.
	Cooldown time.Duration
	// Clock tells the time. Default: SystemClock.
	Clock Clock
	// Logger receives state changes (open, closed) at Warn and Info level.
	// Default: slog.Default(); for the breaker that BreakerFor returns, the
	// Logger of the first feature built on the client with one set.
	Logger *slog.Logger
	// Observer receives ObsBreakerChange on every change of state.
	// Default: nil; for the breaker that BreakerFor returns, the Observer
	// of the first feature built on the client with one set.
	Observer Observer
}

// Breaker is the circuit breaker shared by the library's features. It keeps
// one state machine per scope. Its scope is one Redis node: the whole server
// for a standalone or sentinel client ("redis"), and each master for a
// cluster (its address), so that one dead master does not switch off the
// features whose keys live on healthy masters. Until the library has read
// the cluster's slot map, a cluster's calls share the scope "cluster".
//
// A scope opens after a run of Failures consecutive failures, refuses calls
// for Cooldown, then lets a single probe through (half-open): its success
// closes the scope, its failure reopens it. While closed, a call costs two
// atomic loads and no lock.
type Breaker struct {
	failures int32
	cooldown time.Duration
	clock    Clock
	// logger and obs are set once: by NewBreaker when its config names
	// them, else by the first feature that has one (adopt).
	logger atomic.Pointer[slog.Logger]
	obs    atomic.Pointer[Observer]
	nodes  sync.Map // scope string -> *breakerNode
}

// adopt makes logger and obs the breaker's, each unless it has one already.
func (b *Breaker) adopt(logger *slog.Logger, obs Observer) {
	if logger != nil && b.logger.Load() == nil {
		b.logger.CompareAndSwap(nil, logger)
	}
	if obs != nil && b.obs.Load() == nil {
		b.obs.CompareAndSwap(nil, &obs)
	}
}

func (b *Breaker) log() *slog.Logger {
	if l := b.logger.Load(); l != nil {
		return l
	}
	return slog.Default()
}

// changed reports scope's change to state s to the observer.
func (b *Breaker) changed(scope string, s BreakerState) {
	if o := b.obs.Load(); o != nil {
		r := ResultClosed
		switch s {
		case BreakerOpen:
			r = ResultOpen
		case BreakerHalfOpen:
			r = ResultHalfOpen
		}
		(*o).Observe(Observation{Kind: ObsBreakerChange, Result: r, Name: scope, N: 1})
	}
}

// NewBreaker returns a Breaker. It panics on a negative Failures or Cooldown
// (see BreakerConfig for the defaults of zero values).
func NewBreaker(cfg BreakerConfig) *Breaker {
	if cfg.Failures < 0 || cfg.Cooldown < 0 {
		panic(fmt.Errorf("%w: %+v", ErrInvalidBreaker, cfg))
	}
	if cfg.Failures == 0 {
		cfg.Failures = 5
	}
	if cfg.Cooldown == 0 {
		cfg.Cooldown = 2 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = SystemClock{}
	}
	b := &Breaker{failures: int32(cfg.Failures), cooldown: cfg.Cooldown, clock: cfg.Clock}
	b.adopt(cfg.Logger, cfg.Observer)
	return b
}

// BreakerStats is a snapshot of one breaker scope.
type BreakerStats struct {
	// Scope is the node address, "redis" or "cluster".
	Scope string `json:"scope"`
	// State is the scope's state now.
	State BreakerState `json:"-"`
	// StateName is State as text, for JSON.
	StateName string `json:"state"`
	// ConsecutiveFailures is the current run of failures.
	ConsecutiveFailures int64 `json:"consecutive_failures"`
	// Successes counts calls Redis answered.
	Successes uint64 `json:"successes"`
	// Failures counts calls that failed and counted against Redis.
	Failures uint64 `json:"failures"`
	// Rejected counts calls refused while open.
	Rejected uint64 `json:"rejected"`
	// Opened counts how often the scope opened.
	Opened uint64 `json:"opened"`
	// OOM reports that the node answered a call with an OOM reply, or that
	// a readiness probe found it full (INFO memory: maxmemory reached under
	// noeviction), within the last 2 s, and that no command Redis refuses
	// when full has succeeded since.
	OOM bool `json:"oom"`
}

// Stats returns a snapshot of every scope the breaker has seen, sorted by
// scope.
func (b *Breaker) Stats() []BreakerStats {
	var out []BreakerStats
	b.nodes.Range(func(k, v any) bool {
		n := v.(*breakerNode)
		s := BreakerState(n.state.Load())
		out = append(out, BreakerStats{
			Scope: k.(string), State: s, StateName: s.String(),
			ConsecutiveFailures: int64(n.run.Load()),
			Successes:           n.successes.Load(), Failures: n.failed.Load(),
			Rejected: n.rejected.Load(), Opened: n.opened.Load(),
			OOM: n.isOOM(b.clock.Now()),
		})
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Scope < out[j].Scope })
	return out
}

// State returns the state of one scope; a scope never used is closed.
func (b *Breaker) State(scope string) BreakerState {
	if v, ok := b.nodes.Load(scope); ok {
		return BreakerState(v.(*breakerNode).state.Load())
	}
	return BreakerClosed
}

// AnyOOM reports whether some scope's node is marked out of memory (see
// BreakerStats.OOM).
func (b *Breaker) AnyOOM() bool {
	now := b.clock.Now()
	oom := false
	b.nodes.Range(func(_, v any) bool {
		oom = v.(*breakerNode).isOOM(now)
		return !oom
	})
	return oom
}

// AnyOpen reports whether some scope refuses calls now (open or half-open).
func (b *Breaker) AnyOpen() bool {
	open := false
	b.nodes.Range(func(_, v any) bool {
		open = BreakerState(v.(*breakerNode).state.Load()) != BreakerClosed
		return !open
	})
	return open
}

func (b *Breaker) node(scope string) *breakerNode {
	if v, ok := b.nodes.Load(scope); ok {
		return v.(*breakerNode)
	}
	v, _ := b.nodes.LoadOrStore(scope, &breakerNode{scope: scope})
	return v.(*breakerNode)
}

type breakerNode struct {
	scope     string
	state     atomic.Int32 // BreakerState
	run       atomic.Int32 // consecutive failures
	since     atomic.Int64 // unix nanos of the last open, or of the probe's start
	successes atomic.Uint64
	failed    atomic.Uint64
	rejected  atomic.Uint64
	opened    atomic.Uint64
	oomAt     atomic.Int64 // unix nanos of the last OOM reply, 0 when cleared
}

func (n *breakerNode) closed() bool { return BreakerState(n.state.Load()) == BreakerClosed }

func (n *breakerNode) markOOM(now time.Time) { n.oomAt.Store(now.UnixNano()) }

func (n *breakerNode) clearOOM() {
	if n.oomAt.Load() != 0 {
		n.oomAt.Store(0)
	}
}

func (n *breakerNode) isOOM(now time.Time) bool {
	at := n.oomAt.Load()
	return at != 0 && now.UnixNano()-at < int64(oomHold)
}

// allow reports whether a call to n may go out now. While open, the first
// call after the cool-down becomes the half-open probe. A probe that never
// reports back (its caller's goroutine died) is replaced after another
// cool-down.
func (b *Breaker) allow(n *breakerNode) bool {
	if BreakerState(n.state.Load()) == BreakerClosed {
		return true
	}
	now := b.clock.Now()
	since := n.since.Load()
	if now.UnixNano()-since < int64(b.cooldown) {
		return false
	}
	if n.since.CompareAndSwap(since, now.UnixNano()) {
		if BreakerState(n.state.Swap(int32(BreakerHalfOpen))) != BreakerHalfOpen {
			b.changed(n.scope, BreakerHalfOpen)
		}
		return true
	}
	return false
}

func (b *Breaker) record(n *breakerNode, o outcome) {
	switch o {
	case healthy:
		n.successes.Add(1)
		if n.run.Load() != 0 {
			n.run.Store(0)
		}
		if n.state.Load() != int32(BreakerClosed) && n.state.Swap(int32(BreakerClosed)) != int32(BreakerClosed) {
			b.log().Info("redisecho: circuit breaker closed: Redis answers again", "scope", n.scope)
			b.changed(n.scope, BreakerClosed)
		}
	case unhealthy:
		n.failed.Add(1)
		run := n.run.Add(1)
		st := BreakerState(n.state.Load())
		if st == BreakerHalfOpen || (st == BreakerClosed && run >= b.failures) {
			n.since.Store(b.clock.Now().UnixNano())
			if BreakerState(n.state.Swap(int32(BreakerOpen))) != BreakerOpen {
				n.opened.Add(1)
				b.changed(n.scope, BreakerOpen)
				b.log().Warn("redisecho: circuit breaker open: Redis calls are refused during the cool-down",
					"scope", n.scope, "consecutive_failures", run, "cooldown", b.cooldown)
			}
		}
	case unknown:
		// A probe whose caller gave up proves nothing: let the next call
		// probe. The scope is open again, and says so (ObsBreakerChange),
		// though n.opened does not count it: nothing failed.
		if n.state.CompareAndSwap(int32(BreakerHalfOpen), int32(BreakerOpen)) {
			n.since.Store(0)
			b.changed(n.scope, BreakerOpen)
		}
	}
}

// rateLog logs handled errors at most once per second, counting the rest.
type rateLog struct {
	logger     *slog.Logger
	clock      Clock
	last       atomic.Int64
	suppressed atomic.Int64
}

// Error logs msg with err unless another message was logged within the last
// second.
func (l *rateLog) Error(msg string, err error, attrs ...any) {
	now := l.clock.Now().UnixNano()
	last := l.last.Load()
	if now-last < int64(time.Second) || !l.last.CompareAndSwap(last, now) {
		l.suppressed.Add(1)
		return
	}
	if n := l.suppressed.Swap(0); n > 0 {
		attrs = append(attrs, "suppressed", n)
	}
	l.logger.Warn(msg, append(attrs, "error", err)...)
}

// clientState is what the library keeps per rueidis client, shared by every
// feature that uses it: the default breaker, the cluster's slot map, and the
// one-time client-side caching check.
type clientState struct {
	breaker *Breaker

	slots       atomic.Pointer[[16384]string] // master address per slot
	slotsErr    atomic.Pointer[error]         // the last refresh's error
	refreshing  atomic.Bool
	lastRefresh atomic.Int64

	caches sync.Map // key prefix -> *cacheLocal

	cacheOnce sync.Once
	// cacheOff is set when the check found that DoCache is a plain round trip.
	cacheOff atomic.Bool
}

var clients sync.Map // rueidis.Client -> *clientState

func stateOf(client rueidis.Client) *clientState {
	if !clientComparable(client) {
		// Cannot be a map key (newBackend refuses it): a state of its own.
		return &clientState{breaker: NewBreaker(BreakerConfig{})}
	}
	if v, ok := clients.Load(client); ok {
		return v.(*clientState)
	}
	v, _ := clients.LoadOrStore(client, &clientState{breaker: NewBreaker(BreakerConfig{})})
	return v.(*clientState)
}

// clientComparable reports whether client can be a map key. Its type alone
// does not tell: a comparable struct may embed a rueidis.Client interface
// holding a value that is not comparable, and hashing it panics.
func clientComparable(client rueidis.Client) (ok bool) {
	if !reflect.TypeOf(client).Comparable() {
		return false
	}
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()
	other := client
	return other == client // panics if some value inside is not comparable
}

// BreakerFor returns the Breaker that every feature using client shares by
// default. Read its Stats to observe Redis health, or pass another Breaker in
// a feature's Options to isolate that feature.
func BreakerFor(client rueidis.Client) *Breaker {
	return stateOf(client).breaker
}

// nodeOf returns the breaker scope of key. On a cluster it reads the slot
// map, which it loads in the background on first use and refreshes at most
// once a second while calls fail over, and every 30 s otherwise.
func (s *clientState) nodeOf(client rueidis.Client, key string, timeout time.Duration) string {
	if client.Mode() != rueidis.ClientModeCluster {
		return "redis"
	}
	m := s.slots.Load()
	last := time.Unix(0, s.lastRefresh.Load())
	if m == nil || time.Since(last) > 30*time.Second {
		s.refreshSlots(client, timeout)
	}
	if m == nil || key == "" {
		return "cluster"
	}
	if addr := m[keySlot(key)]; addr != "" {
		return addr
	}
	return "cluster"
}

func (s *clientState) refreshSlots(client rueidis.Client, timeout time.Duration) {
	if time.Since(time.Unix(0, s.lastRefresh.Load())) < time.Second || !s.refreshing.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.refreshing.Store(false)
		defer s.lastRefresh.Store(time.Now().UnixNano())
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		ranges, err := client.Do(ctx, client.B().ClusterSlots().Build()).ToArray()
		if err != nil {
			s.slotsErr.Store(&err)
			return
		}
		var m [16384]string
		for _, r := range ranges {
			f, err := r.ToArray()
			if err != nil || len(f) < 3 {
				continue
			}
			lo, _ := f[0].AsInt64()
			hi, _ := f[1].AsInt64()
			node, err := f[2].ToArray()
			if err != nil || len(node) < 2 {
				continue
			}
			host, _ := node[0].ToString()
			port, _ := node[1].AsInt64()
			addr := slotEndpoint(host, port)
			if addr == "" {
				continue // the slots' calls share the scope "cluster"
			}
			for slot := lo; slot <= hi && slot < 16384; slot++ {
				m[slot] = addr
			}
		}
		s.slots.Store(&m)
	}()
}

// slotEndpoint is a CLUSTER SLOTS node address spelled as rueidis spells
// the keys of Nodes() (net.JoinHostPort, so "[::1]:7000" for IPv6), so that
// a scope and a readiness probe name a node alike. "" (a node that does not
// know its own address) and "?" (an unknown endpoint) give "".
func slotEndpoint(host string, port int64) string {
	if host == "" || host == "?" {
		return ""
	}
	return net.JoinHostPort(host, strconv.FormatInt(port, 10))
}

// checkCache finds out once per client, in the background, whether DoCache
// really serves repeated reads from memory. It is off with DisableCache,
// with RESP2 (AlwaysRESP2, Redis < 6) and with servers without CLIENT
// TRACKING such as miniredis; rueidis then silently sends every DoCache to
// Redis. The check reads one missing key a few times through DoCache and
// logs a warning if no read was a cache hit.
func (s *clientState) checkCache(client rueidis.Client, log *rateLog, timeout time.Duration) {
	s.cacheOnce.Do(func() {
		go func() {
			key := Keyspace{}.Key("csc-check")
			for range 8 {
				ctx, cancel := context.WithTimeout(context.Background(), timeout)
				res := client.DoCache(ctx, client.B().Get().Key(key).Cache().Pin(), time.Minute) // Pin: see backend.DoCache
				cancel()
				if res.IsCacheHit() {
					return
				}
				if err := res.Error(); err != nil && !rueidis.IsRedisNil(err) {
					return // Redis is down: nothing can be told now
				}
			}
			s.cacheOff.Store(true)
			log.logger.Warn("redisecho: client-side caching is off for this rueidis client " +
				"(DisableCache, RESP2, or a server without CLIENT TRACKING such as miniredis): " +
				"cache hits, session reads and other cached reads each cost a Redis round trip " +
				"instead of being served from process memory")
		}()
	})
}

// statusReply reads a script's reply of the form {status, values...}: the
// array and its first element as a string ("" when missing).
func statusReply(res rueidis.RedisResult) (vals []rueidis.RedisMessage, status string, err error) {
	if vals, err = res.ToArray(); err != nil {
		return nil, "", err
	}
	if len(vals) > 0 {
		status, _ = vals[0].ToString()
	}
	return vals, status, nil
}
