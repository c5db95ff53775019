// Package otelredisecho reports what redisecho's features do through the
// OpenTelemetry metric and trace APIs. It is a module of its own, so that
// users of redisecho who do not want OpenTelemetry never download it.
//
//	obs, err := otelredisecho.New(otelredisecho.Config{MeterProvider: mp, TracerProvider: tp})
//	e.Use(redisecho.SessionWithConfig(redisecho.SessionConfig{Client: client, Options: redisecho.Options{Observer: obs}}))
//
// Every instrument is named under "redisecho." with its unit; see the
// README's Observability section for the list. Attribute sets are built
// once per combination and kept, so a counter add or a histogram record
// allocates nothing.
package otelredisecho

import (
	"context"
	"errors"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redisecho/redisecho"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// ScopeName is the instrumentation scope of the meter and the tracer.
const ScopeName = "github.com/redisecho/redisecho/otel"

// Attribute keys the instruments use.
const (
	// AttrResult is an outcome: "ok"/"error", a cache result ("hit",
	// "miss", "stale", "bypass", "uncacheable"), a session load's source
	// ("memory", "redis", "new", "invalid"), a rate-limit decision
	// ("allowed", "denied", "degraded"), a job attempt's ("completed",
	// "failed") or a breaker state ("closed", "open", "half-open").
	AttrResult = attribute.Key("redisecho.result")
	// AttrLimiter is a limiter's name (LimiterConfig.Name, RateLimitConfig.Name).
	AttrLimiter = attribute.Key("redisecho.ratelimit.limiter")
	// AttrPolicy is a rate-limit policy's name (Policy.Name: by default
	// "<limit>-per-<window>", e.g. "100-per-1m").
	AttrPolicy = attribute.Key("redisecho.ratelimit.policy")
	// AttrPath is how a rate-limit decision was made: "redis", "local",
	// "fallback".
	AttrPath = attribute.Key("redisecho.ratelimit.path")
	// AttrQueue is a job queue's name.
	AttrQueue = attribute.Key("messaging.destination.name")
	// AttrJobState is a state of jobs in a queue: "scheduled", "pending",
	// "active", "retrying", "completed", "dead".
	AttrJobState = attribute.Key("redisecho.job.state")
	// AttrFeature is the feature that made a Redis call: "session",
	// "cache", "ratelimit", "realtime", "jobs".
	AttrFeature = attribute.Key("redisecho.feature")
	// AttrNode is a breaker scope: a Redis node's address, "redis" for a
	// standalone server, "cluster" before the slot map is known.
	AttrNode = attribute.Key("redisecho.redis.node")
)

// DefaultGaugeTimeout bounds the Redis reads of one collection of the
// queue-depth gauges when Config.GaugeTimeout is zero.
const DefaultGaugeTimeout = 500 * time.Millisecond

// MaxAttributeSets bounds the attribute sets an Observer keeps. Names are
// configured (policies, queues) or bounded (nodes), so a real app stays far
// below it; past it, new combinations are reported under the name
// "_other", so that a misconfiguration cannot grow memory without bound.
const MaxAttributeSets = 1024

// Config configures an Observer.
type Config struct {
	// MeterProvider makes the meter. Default: otel.GetMeterProvider().
	MeterProvider metric.MeterProvider
	// TracerProvider makes the tracer. Default: otel.GetTracerProvider().
	TracerProvider trace.TracerProvider
	// Propagator writes the trace context stored with each job and reads
	// it back for the job attempt's span link. Default:
	// propagation.TraceContext{} (W3C traceparent and tracestate).
	Propagator propagation.TextMapPropagator
	// GaugeTimeout bounds the Redis reads (one pipelined read per queue,
	// all queues concurrently) of one collection of the queue-depth gauge.
	// A queue whose read fails or times out is left out of that
	// collection. Default: DefaultGaugeTimeout (500 ms).
	GaugeTimeout time.Duration
	// NoQueueDepth turns the queue-depth gauge off (it reads Redis on every
	// collection). Default: false, the gauge is on.
	NoQueueDepth bool
}

// Observer is a redisecho.Observer, redisecho.Tracer and
// redisecho.StateObserver that reports through OpenTelemetry. Build it with
// New; it is safe for concurrent use. Pass the same one in every feature's
// Options.
type Observer struct {
	tracer       trace.Tracer
	prop         propagation.TextMapPropagator
	gaugeTimeout time.Duration
	reg          metric.Registration

	// One instrument per counted kind (nil where the kind is not counted).
	counters [redisecho.NumObsKinds]metric.Int64Counter
	conns    metric.Int64UpDownCounter

	redisDur, fillDur, entrySize, jobDur, pickup metric.Float64Histogram

	mu    sync.Mutex
	sets  atomic.Pointer[map[setKey]*attrs]
	nsets int

	smu      sync.Mutex
	breakers []*redisecho.Breaker
	queues   map[string]*redisecho.Queue
}

// setKey identifies an attribute set: the observation's kind, result,
// path, name and group.
type setKey struct {
	kind   redisecho.ObsKind
	result redisecho.Result
	path   redisecho.Path
	name   string
	group  string
}

// attrs is one attribute set as ready-made options.
type attrs struct {
	add []metric.AddOption
	rec []metric.RecordOption
	obs []metric.ObserveOption
}

func newAttrs(kv ...attribute.KeyValue) *attrs {
	o := metric.WithAttributeSet(attribute.NewSet(kv...))
	return &attrs{add: []metric.AddOption{o}, rec: []metric.RecordOption{o}, obs: []metric.ObserveOption{o}}
}

var none = newAttrs()

// instrument describes a counter: its name, description and unit.
type instrument struct {
	name, desc, unit string
}

var counted = map[redisecho.ObsKind]instrument{
	redisecho.ObsSessionLoad:        {"redisecho.session.loads", "Session reads by source (memory: client-side caching; redis; new; invalid cookie).", "{load}"},
	redisecho.ObsSessionSave:        {"redisecho.session.saves", "Session writes by result.", "{save}"},
	redisecho.ObsSessionStaleBypass: {"redisecho.session.stale_bypasses", "Session reads whose cached copy was older than the cookie and went to Redis.", "{read}"},
	redisecho.ObsSessionError:       {"redisecho.session.errors", "Session reads that Redis failed.", "{error}"},
	redisecho.ObsCacheRequest:       {"redisecho.cache.requests", "Cache reads by result.", "{request}"},
	redisecho.ObsCacheFill:          {"redisecho.cache.fills", "Values computed and stored by this instance.", "{fill}"},
	redisecho.ObsCacheWait:          {"redisecho.cache.waits", "Reads that waited for another fill of their key (stampede protection).", "{wait}"},
	redisecho.ObsCacheInvalidation:  {"redisecho.cache.invalidations", "Cache entries invalidated.", "{entry}"},
	redisecho.ObsLimitDecision:      {"redisecho.ratelimit.decisions", "Rate-limit decisions by policy, result and path.", "{decision}"},
	redisecho.ObsPublish:            {"redisecho.realtime.published", "Events published to the hub.", "{event}"},
	redisecho.ObsDeliver:            {"redisecho.realtime.delivered", "Events queued or replayed to clients.", "{event}"},
	redisecho.ObsDropSlow:           {"redisecho.realtime.dropped_slow", "Clients disconnected for falling behind.", "{client}"},
	redisecho.ObsResume:             {"redisecho.realtime.resumes", "Streams that resumed from a position.", "{stream}"},
	redisecho.ObsReset:              {"redisecho.realtime.resets", "Reset events sent to clients whose position was lost.", "{event}"},
	redisecho.ObsJobEnqueued:        {"redisecho.jobs.enqueued", "Jobs enqueued.", "{job}"},
	redisecho.ObsJobStarted:         {"redisecho.jobs.started", "Job attempts started.", "{attempt}"},
	redisecho.ObsJobCompleted:       {"redisecho.jobs.completed", "Job attempts that completed.", "{attempt}"},
	redisecho.ObsJobFailed:          {"redisecho.jobs.failed", "Job attempts that failed.", "{attempt}"},
	redisecho.ObsJobRetried:         {"redisecho.jobs.retried", "Failed jobs scheduled for another attempt.", "{job}"},
	redisecho.ObsJobDead:            {"redisecho.jobs.dead", "Jobs moved to the dead set.", "{job}"},
	redisecho.ObsJobReaped:          {"redisecho.jobs.reaped", "Jobs taken back from workers whose lease ran out.", "{job}"},
	redisecho.ObsJobLeaseLost:       {"redisecho.jobs.leases_lost", "Attempts this worker stopped because its lease was lost.", "{attempt}"},
	redisecho.ObsRedisCall:          {"redisecho.redis.errors", "Redis calls that failed (timeouts, network errors, a server that cannot serve).", "{error}"},
	redisecho.ObsBreakerChange:      {"redisecho.redis.breaker.transitions", "Circuit breaker state changes by node and new state.", "{transition}"},
}

// Bucket boundaries, in seconds or bytes.
var (
	redisBuckets  = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}
	fillBuckets   = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}
	sizeBuckets   = []float64{128, 512, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20}
	jobBuckets    = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}
	pickupBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300}
)

// New returns an Observer whose instruments are made by cfg's providers.
// It does no I/O; the queue-depth gauge reads Redis when the meter's
// reader collects.
func New(cfg Config) (*Observer, error) {
	if cfg.GaugeTimeout < 0 {
		return nil, errors.New("otelredisecho: GaugeTimeout must not be negative")
	}
	if cfg.MeterProvider == nil {
		cfg.MeterProvider = otel.GetMeterProvider()
	}
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = otel.GetTracerProvider()
	}
	if cfg.Propagator == nil {
		cfg.Propagator = propagation.TraceContext{}
	}
	if cfg.GaugeTimeout == 0 {
		cfg.GaugeTimeout = DefaultGaugeTimeout
	}
	m := cfg.MeterProvider.Meter(ScopeName)
	o := &Observer{
		tracer:       cfg.TracerProvider.Tracer(ScopeName),
		prop:         cfg.Propagator,
		gaugeTimeout: cfg.GaugeTimeout,
		queues:       map[string]*redisecho.Queue{},
	}
	o.sets.Store(&map[setKey]*attrs{})
	var err error
	for kind, in := range counted {
		if o.counters[kind], err = m.Int64Counter(in.name, metric.WithDescription(in.desc), metric.WithUnit(in.unit)); err != nil {
			return nil, err
		}
	}
	if o.conns, err = m.Int64UpDownCounter("redisecho.realtime.connections",
		metric.WithDescription("Open SSE streams on this instance."), metric.WithUnit("{connection}")); err != nil {
		return nil, err
	}
	hist := func(name, desc, unit string, b []float64) (metric.Float64Histogram, error) {
		return m.Float64Histogram(name, metric.WithDescription(desc), metric.WithUnit(unit), metric.WithExplicitBucketBoundaries(b...))
	}
	if o.redisDur, err = hist("redisecho.redis.call.duration", "Redis round trips by feature (client-side cache hits and blocking waits are not round trips).", "s", redisBuckets); err != nil {
		return nil, err
	}
	if o.fillDur, err = hist("redisecho.cache.fill.duration", "Time to compute and store a cache value.", "s", fillBuckets); err != nil {
		return nil, err
	}
	if o.entrySize, err = hist("redisecho.cache.entry.size", "Size of the cache entries this instance stored.", "By", sizeBuckets); err != nil {
		return nil, err
	}
	if o.jobDur, err = hist("redisecho.jobs.duration", "Run time of job attempts by queue and result.", "s", jobBuckets); err != nil {
		return nil, err
	}
	if o.pickup, err = hist("redisecho.jobs.pickup.latency", "Time from a job being due to its attempt starting.", "s", pickupBuckets); err != nil {
		return nil, err
	}
	breakerState, err := m.Int64ObservableGauge("redisecho.redis.breaker.state",
		metric.WithDescription("Circuit breaker state per node: 0 closed, 1 open, 2 half-open."), metric.WithUnit("{state}"))
	if err != nil {
		return nil, err
	}
	insts := []metric.Observable{breakerState}
	var depth metric.Int64ObservableGauge
	if !cfg.NoQueueDepth {
		if depth, err = m.Int64ObservableGauge("redisecho.jobs.depth",
			metric.WithDescription("Jobs in each state per queue, read from Redis: every instance reports the same global value, so aggregate with max."),
			metric.WithUnit("{job}")); err != nil {
			return nil, err
		}
		insts = append(insts, depth)
	}
	o.reg, err = m.RegisterCallback(func(ctx context.Context, ob metric.Observer) error {
		o.observeBreakers(ob, breakerState)
		if depth != nil {
			o.observeDepth(ctx, ob, depth)
		}
		return nil
	}, insts...)
	if err != nil {
		return nil, err
	}
	return o, nil
}

// Close unregisters the gauges' callback. The Observer keeps counting.
func (o *Observer) Close() error { return o.reg.Unregister() }

// Observe implements redisecho.Observer.
func (o *Observer) Observe(ob redisecho.Observation) {
	ctx := context.Background()
	switch ob.Kind {
	case redisecho.ObsStreamOpen:
		o.conns.Add(ctx, ob.N, none.add...)
		return
	case redisecho.ObsStreamClose:
		o.conns.Add(ctx, -ob.N, none.add...)
		return
	case redisecho.ObsRedisCall:
		a := o.attrs(setKey{kind: ob.Kind, name: ob.Name})
		o.redisDur.Record(ctx, ob.Duration.Seconds(), a.rec...)
		if ob.Result == redisecho.ResultError {
			o.counters[ob.Kind].Add(ctx, ob.N, a.add...)
		}
		return
	case redisecho.ObsCacheFill:
		o.fillDur.Record(ctx, ob.Duration.Seconds(), none.rec...)
		o.entrySize.Record(ctx, float64(ob.Size), none.rec...)
	case redisecho.ObsJobStarted:
		o.pickup.Record(ctx, ob.Duration.Seconds(), o.attrs(setKey{kind: ob.Kind, name: ob.Name}).rec...)
	case redisecho.ObsJobCompleted, redisecho.ObsJobFailed:
		r := redisecho.ResultOK
		if ob.Kind == redisecho.ObsJobFailed {
			r = redisecho.ResultError
		}
		o.jobDur.Record(ctx, ob.Duration.Seconds(), o.attrs(setKey{kind: redisecho.ObsJobCompleted, result: r, name: ob.Name}).rec...)
	}
	if int(ob.Kind) >= len(o.counters) {
		return
	}
	if c := o.counters[ob.Kind]; c != nil {
		c.Add(ctx, ob.N, o.attrs(setKey{kind: ob.Kind, result: ob.Result, path: ob.Path, name: ob.Name, group: ob.Group}).add...)
	}
}

// attrs returns the options of k's attribute set, building it on first use.
func (o *Observer) attrs(k setKey) *attrs {
	cur := *o.sets.Load()
	if a, ok := cur[k]; ok {
		return a
	}
	if len(cur) >= MaxAttributeSets {
		// Past the bound: the overflow set, without the lock.
		k.name, k.group = "_other", ""
		if a, ok := cur[k]; ok {
			return a
		}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	cur = *o.sets.Load()
	if a, ok := cur[k]; ok {
		return a
	}
	if o.nsets >= MaxAttributeSets {
		k.name, k.group = "_other", ""
		if a, ok := cur[k]; ok {
			return a
		}
	}
	a := newAttrs(attributesOf(k)...)
	next := make(map[setKey]*attrs, len(cur)+1)
	for kk, v := range cur {
		next[kk] = v
	}
	next[k] = a
	o.nsets++
	o.sets.Store(&next)
	return a
}

// attributesOf returns the attributes of k for its kind.
func attributesOf(k setKey) []attribute.KeyValue {
	var kv []attribute.KeyValue
	switch k.kind {
	case redisecho.ObsLimitDecision:
		kv = append(kv, AttrLimiter.String(k.group), AttrPolicy.String(k.name))
		if k.path != redisecho.PathNone {
			kv = append(kv, AttrPath.String(k.path.String()))
		}
	case redisecho.ObsRedisCall:
		kv = append(kv, AttrFeature.String(k.name))
	case redisecho.ObsBreakerChange:
		kv = append(kv, AttrNode.String(k.name))
	case redisecho.ObsJobEnqueued, redisecho.ObsJobStarted, redisecho.ObsJobCompleted, redisecho.ObsJobFailed,
		redisecho.ObsJobRetried, redisecho.ObsJobDead, redisecho.ObsJobReaped, redisecho.ObsJobLeaseLost:
		kv = append(kv, AttrQueue.String(k.name))
		if k.kind == redisecho.ObsJobCompleted && k.result != redisecho.ResultNone {
			res := "completed"
			if k.result == redisecho.ResultError {
				res = "failed"
			}
			return append(kv, AttrResult.String(res))
		}
	}
	if k.result != redisecho.ResultNone {
		kv = append(kv, AttrResult.String(k.result.String()))
	}
	return kv
}

// ObserveBreaker implements redisecho.StateObserver: the breaker's scopes
// are reported by the breaker-state gauge, from process memory.
func (o *Observer) ObserveBreaker(b *redisecho.Breaker) {
	o.smu.Lock()
	defer o.smu.Unlock()
	for _, have := range o.breakers {
		if have == b {
			return
		}
	}
	o.breakers = append(o.breakers, b)
}

// ObserveQueue implements redisecho.StateObserver: the queue's depth per
// state is read from Redis at each collection (the last Queue handed over
// for a name is the one read).
func (o *Observer) ObserveQueue(q *redisecho.Queue) {
	o.smu.Lock()
	defer o.smu.Unlock()
	if len(o.queues) < MaxAttributeSets {
		o.queues[q.Name()] = q
	}
}

func (o *Observer) observeBreakers(ob metric.Observer, g metric.Int64ObservableGauge) {
	o.smu.Lock()
	bs := append([]*redisecho.Breaker(nil), o.breakers...)
	o.smu.Unlock()
	seen := map[string]bool{}
	for _, b := range bs {
		for _, s := range b.Stats() {
			if seen[s.Scope] {
				continue // two breakers over one node: the first one's
			}
			seen[s.Scope] = true
			ob.ObserveInt64(g, int64(s.State), o.attrs(setKey{kind: redisecho.ObsBreakerChange, name: s.Scope}).obs...)
		}
	}
}

var jobStates = [...]string{"scheduled", "pending", "active", "retrying", "completed", "dead"}

func (o *Observer) observeDepth(ctx context.Context, ob metric.Observer, g metric.Int64ObservableGauge) {
	o.smu.Lock()
	qs := make([]*redisecho.Queue, 0, len(o.queues))
	for _, q := range o.queues {
		qs = append(qs, q)
	}
	o.smu.Unlock()
	if len(qs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, o.gaugeTimeout)
	defer cancel()
	counts := make([]redisecho.JobCounts, len(qs))
	ok := make([]bool, len(qs))
	var wg sync.WaitGroup
	for i, q := range qs {
		wg.Go(func() {
			c, err := q.Counts(ctx)
			counts[i], ok[i] = c, err == nil
		})
	}
	wg.Wait()
	for i, q := range qs {
		if !ok[i] {
			continue
		}
		c := counts[i]
		for j, n := range [...]int64{c.Scheduled, c.Pending, c.Active, c.Retrying, c.Completed, c.Dead} {
			ob.ObserveInt64(g, n, metric.WithAttributes(AttrQueue.String(q.Name()), AttrJobState.String(jobStates[j])))
		}
	}
}

// StartSpan implements redisecho.Tracer: a consumer span per job attempt,
// named "process <queue>" and linked to the span that enqueued the job;
// internal spans "redisecho.cache.fill" and "redisecho.session.save".
func (o *Observer) StartSpan(ctx context.Context, s redisecho.Span) (context.Context, func(error)) {
	var span trace.Span
	switch s.Op {
	case redisecho.SpanJobAttempt:
		opts := []trace.SpanStartOption{
			trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(
				attribute.String("messaging.system", "redisecho"),
				attribute.String("messaging.operation.type", "process"),
				AttrQueue.String(s.Name),
				attribute.String("messaging.message.id", s.JobID),
				attribute.String("redisecho.job.type", s.JobType),
				attribute.Int("redisecho.job.attempt", s.Attempt),
			),
		}
		if s.Link != "" {
			if sc := trace.SpanContextFromContext(o.extract(s.Link)); sc.IsValid() {
				opts = append(opts, trace.WithLinks(trace.Link{SpanContext: sc}))
			}
		}
		ctx, span = o.tracer.Start(ctx, "process "+s.Name, opts...)
	case redisecho.SpanCacheFill:
		ctx, span = o.tracer.Start(ctx, "redisecho.cache.fill", trace.WithAttributes(attribute.String("redisecho.cache.prefix", s.Name)))
	default:
		ctx, span = o.tracer.Start(ctx, "redisecho."+s.Op.String())
	}
	return ctx, func(err error) {
		if err != nil {
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
	}
}

// InjectTrace implements redisecho.Tracer: ctx's trace context as written
// by the propagator, URL-query encoded ("traceparent=00-…"); "" when ctx
// carries none.
func (o *Observer) InjectTrace(ctx context.Context) string {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return ""
	}
	c := propagation.MapCarrier{}
	o.prop.Inject(ctx, c)
	v := url.Values{}
	for k, s := range c {
		v.Set(k, s)
	}
	return v.Encode()
}

func (o *Observer) extract(text string) context.Context {
	v, err := url.ParseQuery(text)
	if err != nil {
		return context.Background()
	}
	c := propagation.MapCarrier{}
	for k := range v {
		c[k] = v.Get(k)
	}
	return o.prop.Extract(context.Background(), c)
}

var (
	_ redisecho.Observer      = (*Observer)(nil)
	_ redisecho.Tracer        = (*Observer)(nil)
	_ redisecho.StateObserver = (*Observer)(nil)
)
