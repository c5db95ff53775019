package otelredisecho

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redisecho/redisecho"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// testSDK is an Observer over an SDK meter with a manual reader and an SDK
// tracer with an in-memory exporter.
type testSDK struct {
	obs    *Observer
	reader *sdkmetric.ManualReader
	spans  *tracetest.InMemoryExporter
	tp     *sdktrace.TracerProvider
}

func newTestSDK(t testing.TB, cfg Config) *testSDK {
	t.Helper()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	spans := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans))
	t.Cleanup(func() {
		_ = mp.Shutdown(context.Background())
		_ = tp.Shutdown(context.Background())
	})
	cfg.MeterProvider, cfg.TracerProvider = mp, tp
	obs, err := New(cfg)
	require.NoError(t, err)
	return &testSDK{obs: obs, reader: reader, spans: spans, tp: tp}
}

// collect reads every metric, by name.
func (s *testSDK) collect(t testing.TB) map[string]metricdata.Metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, s.reader.Collect(context.Background(), &rm))
	out := map[string]metricdata.Metrics{}
	for _, sm := range rm.ScopeMetrics {
		require.Equal(t, ScopeName, sm.Scope.Name)
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

// sum returns the value of the sum metric name for the data point whose
// attributes are exactly kv (0 and false when it has none such).
func sum(t testing.TB, ms map[string]metricdata.Metrics, name string, kv ...attribute.KeyValue) (int64, bool) {
	t.Helper()
	m, ok := ms[name]
	if !ok {
		return 0, false
	}
	want := attribute.NewSet(kv...)
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		for _, p := range d.DataPoints {
			if p.Attributes.Equals(&want) {
				return p.Value, true
			}
		}
	case metricdata.Gauge[int64]:
		for _, p := range d.DataPoints {
			if p.Attributes.Equals(&want) {
				return p.Value, true
			}
		}
	default:
		t.Fatalf("%s is a %T", name, m.Data)
	}
	return 0, false
}

// hist returns the count and sum of the histogram name's data point whose
// attributes are exactly kv.
func hist(t testing.TB, ms map[string]metricdata.Metrics, name string, kv ...attribute.KeyValue) (uint64, float64) {
	t.Helper()
	m, ok := ms[name]
	require.True(t, ok, "no metric %s", name)
	want := attribute.NewSet(kv...)
	for _, p := range m.Data.(metricdata.Histogram[float64]).DataPoints {
		if p.Attributes.Equals(&want) {
			return p.Count, p.Sum
		}
	}
	return 0, 0
}

func TestCountersFromObservations(t *testing.T) {
	s := newTestSDK(t, Config{NoQueueDepth: true})
	o := s.obs
	obs := func(kind redisecho.ObsKind, res redisecho.Result, name string, n int64) {
		o.Observe(redisecho.Observation{Kind: kind, Result: res, Name: name, N: n})
	}
	obs(redisecho.ObsSessionLoad, redisecho.ResultMemory, "", 3)
	obs(redisecho.ObsSessionLoad, redisecho.ResultRedis, "", 1)
	obs(redisecho.ObsSessionSave, redisecho.ResultOK, "", 2)
	obs(redisecho.ObsCacheRequest, redisecho.ResultHit, "", 5)
	obs(redisecho.ObsCacheRequest, redisecho.ResultMiss, "", 1)
	o.Observe(redisecho.Observation{Kind: redisecho.ObsCacheFill, N: 1, Size: 2048, Duration: 3 * time.Millisecond})
	o.Observe(redisecho.Observation{Kind: redisecho.ObsLimitDecision, Result: redisecho.ResultDenied, Path: redisecho.PathLocal, Name: "100-per-1m", Group: "api", N: 4})
	o.Observe(redisecho.Observation{Kind: redisecho.ObsLimitDecision, Result: redisecho.ResultAllowed, Path: redisecho.PathRedis, Name: "100-per-1m", Group: "api", N: 7})
	obs(redisecho.ObsStreamOpen, redisecho.ResultNone, "", 1)
	obs(redisecho.ObsStreamOpen, redisecho.ResultNone, "", 1)
	obs(redisecho.ObsStreamClose, redisecho.ResultNone, "", 1)
	obs(redisecho.ObsDeliver, redisecho.ResultNone, "", 40)
	obs(redisecho.ObsJobEnqueued, redisecho.ResultNone, "emails", 10)
	o.Observe(redisecho.Observation{Kind: redisecho.ObsJobStarted, Name: "emails", N: 1, Duration: 2 * time.Millisecond})
	o.Observe(redisecho.Observation{Kind: redisecho.ObsJobCompleted, Name: "emails", N: 1, Duration: 50 * time.Millisecond})
	o.Observe(redisecho.Observation{Kind: redisecho.ObsJobFailed, Name: "emails", N: 1, Duration: 10 * time.Millisecond})
	o.Observe(redisecho.Observation{Kind: redisecho.ObsRedisCall, Result: redisecho.ResultOK, Name: "cache", N: 1, Duration: time.Millisecond})
	o.Observe(redisecho.Observation{Kind: redisecho.ObsRedisCall, Result: redisecho.ResultError, Name: "cache", N: 1, Duration: 500 * time.Millisecond})
	obs(redisecho.ObsBreakerChange, redisecho.ResultOpen, "127.0.0.1:7000", 1)

	ms := s.collect(t)
	for _, c := range []struct {
		name string
		kv   []attribute.KeyValue
		want int64
	}{
		{"redisecho.session.loads", []attribute.KeyValue{AttrResult.String("memory")}, 3},
		{"redisecho.session.loads", []attribute.KeyValue{AttrResult.String("redis")}, 1},
		{"redisecho.session.saves", []attribute.KeyValue{AttrResult.String("ok")}, 2},
		{"redisecho.cache.requests", []attribute.KeyValue{AttrResult.String("hit")}, 5},
		{"redisecho.cache.requests", []attribute.KeyValue{AttrResult.String("miss")}, 1},
		{"redisecho.cache.fills", nil, 1},
		{"redisecho.ratelimit.decisions", []attribute.KeyValue{AttrLimiter.String("api"), AttrPolicy.String("100-per-1m"), AttrResult.String("denied"), AttrPath.String("local")}, 4},
		{"redisecho.ratelimit.decisions", []attribute.KeyValue{AttrLimiter.String("api"), AttrPolicy.String("100-per-1m"), AttrResult.String("allowed"), AttrPath.String("redis")}, 7},
		{"redisecho.realtime.connections", nil, 1},
		{"redisecho.realtime.delivered", nil, 40},
		{"redisecho.jobs.enqueued", []attribute.KeyValue{AttrQueue.String("emails")}, 10},
		{"redisecho.jobs.started", []attribute.KeyValue{AttrQueue.String("emails")}, 1},
		{"redisecho.jobs.completed", []attribute.KeyValue{AttrQueue.String("emails")}, 1},
		{"redisecho.jobs.failed", []attribute.KeyValue{AttrQueue.String("emails")}, 1},
		{"redisecho.redis.errors", []attribute.KeyValue{AttrFeature.String("cache")}, 1},
		{"redisecho.redis.breaker.transitions", []attribute.KeyValue{AttrNode.String("127.0.0.1:7000"), AttrResult.String("open")}, 1},
	} {
		got, ok := sum(t, ms, c.name, c.kv...)
		require.True(t, ok, "%s%v has a data point", c.name, c.kv)
		require.Equal(t, c.want, got, "%s%v", c.name, c.kv)
	}

	n, total := hist(t, ms, "redisecho.cache.entry.size")
	require.Equal(t, uint64(1), n)
	require.Equal(t, 2048.0, total)
	n, total = hist(t, ms, "redisecho.redis.call.duration", AttrFeature.String("cache"))
	require.Equal(t, uint64(2), n, "failed calls have a duration too")
	require.InDelta(t, 0.501, total, 1e-9)
	n, total = hist(t, ms, "redisecho.jobs.duration", AttrQueue.String("emails"), AttrResult.String("completed"))
	require.Equal(t, uint64(1), n)
	require.InDelta(t, 0.05, total, 1e-9)
	n, _ = hist(t, ms, "redisecho.jobs.duration", AttrQueue.String("emails"), AttrResult.String("failed"))
	require.Equal(t, uint64(1), n)
	n, total = hist(t, ms, "redisecho.jobs.pickup.latency", AttrQueue.String("emails"))
	require.Equal(t, uint64(1), n)
	require.InDelta(t, 0.002, total, 1e-9)

	// Every instrument has a unit and a description.
	for name, m := range ms {
		require.NotEmpty(t, m.Unit, name)
		require.NotEmpty(t, m.Description, name)
		require.Regexp(t, `^redisecho\.[a-z_.]+$`, name)
	}
	require.Equal(t, "s", ms["redisecho.redis.call.duration"].Unit)
	require.Equal(t, "By", ms["redisecho.cache.entry.size"].Unit)
}

func TestObserveAllocatesNothing(t *testing.T) {
	s := newTestSDK(t, Config{NoQueueDepth: true})
	policy := "api"
	for _, o := range []redisecho.Observation{
		{Kind: redisecho.ObsSessionLoad, Result: redisecho.ResultMemory, N: 1},
		{Kind: redisecho.ObsCacheRequest, Result: redisecho.ResultHit, N: 1},
		{Kind: redisecho.ObsLimitDecision, Result: redisecho.ResultAllowed, Path: redisecho.PathRedis, Name: policy, N: 1},
		{Kind: redisecho.ObsRedisCall, Result: redisecho.ResultOK, Name: "session", N: 1, Duration: time.Millisecond},
		{Kind: redisecho.ObsJobCompleted, Name: "emails", N: 1, Duration: time.Millisecond},
		{Kind: redisecho.ObsStreamOpen, N: 1},
	} {
		s.obs.Observe(o) // the first builds the attribute set
		allocs := testing.AllocsPerRun(1000, func() { s.obs.Observe(o) })
		require.Zero(t, allocs, "%v", o.Kind)
	}
}

func TestAttributeSetsAreBounded(t *testing.T) {
	s := newTestSDK(t, Config{NoQueueDepth: true})
	for i := range MaxAttributeSets + 100 {
		s.obs.Observe(redisecho.Observation{Kind: redisecho.ObsLimitDecision, Result: redisecho.ResultAllowed, Name: string(rune('a'+i%26)) + time.Duration(i).String(), N: 1})
	}
	require.LessOrEqual(t, len(*s.obs.sets.Load()), MaxAttributeSets+1)
	ms := s.collect(t)
	got, ok := sum(t, ms, "redisecho.ratelimit.decisions", AttrLimiter.String(""), AttrPolicy.String("_other"), AttrResult.String("allowed"))
	require.True(t, ok)
	require.Equal(t, int64(100), got, "what is past the bound is counted under _other")
}

func TestSpans(t *testing.T) {
	s := newTestSDK(t, Config{NoQueueDepth: true})
	tracer := s.tp.Tracer("test")

	// The request that enqueues: its trace context is written as text.
	reqCtx, req := tracer.Start(context.Background(), "POST /api/emails")
	text := s.obs.InjectTrace(reqCtx)
	req.End()
	require.Contains(t, text, "traceparent=00-"+req.SpanContext().TraceID().String())
	require.Empty(t, s.obs.InjectTrace(context.Background()), "no span, nothing stored")

	ctx, end := s.obs.StartSpan(context.Background(), redisecho.Span{Op: redisecho.SpanJobAttempt, Name: "emails", JobType: "welcome", JobID: "j1", Attempt: 2, Link: text})
	require.True(t, tracerSpanValid(ctx))
	end(errors.New("smtp down"))
	_, end = s.obs.StartSpan(context.Background(), redisecho.Span{Op: redisecho.SpanCacheFill, Name: "redisecho:"})
	end(nil)
	_, end = s.obs.StartSpan(context.Background(), redisecho.Span{Op: redisecho.SpanSessionSave})
	end(nil)
	_, end = s.obs.StartSpan(context.Background(), redisecho.Span{Op: redisecho.SpanJobAttempt, Name: "emails", Link: "%%garbage"})
	end(nil)

	got := s.spans.GetSpans()
	require.Len(t, got, 5)
	job := got[1]
	require.Equal(t, "process emails", job.Name)
	require.Len(t, job.Links, 1, "linked to the enqueuing request")
	require.Equal(t, req.SpanContext().SpanID(), job.Links[0].SpanContext.SpanID())
	require.NotEqual(t, req.SpanContext().TraceID(), job.SpanContext.TraceID(), "a trace of its own")
	require.Equal(t, "Error", job.Status.Code.String())
	require.Contains(t, job.Attributes, attribute.String("messaging.message.id", "j1"))
	require.Contains(t, job.Attributes, attribute.Int("redisecho.job.attempt", 2))
	require.Equal(t, "redisecho.cache.fill", got[2].Name)
	require.Equal(t, "redisecho.session.save", got[3].Name)
	require.Empty(t, got[4].Links, "an unreadable link is dropped, the span still runs")
}

func tracerSpanValid(ctx context.Context) bool {
	return traceSpanContext(ctx).IsValid()
}

func traceSpanContext(ctx context.Context) trace.SpanContext {
	return trace.SpanContextFromContext(ctx)
}
