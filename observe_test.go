package redisecho

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// obsKey is what recorder counts by: everything of an Observation but its
// numbers.
type obsKey struct {
	Kind   ObsKind
	Result Result
	Path   Path
	Name   string
}

func (k obsKey) String() string {
	return fmt.Sprintf("%v/%v/%v/%s", k.Kind, k.Result, k.Path, k.Name)
}

// recorder is the test Observer: it sums N per obsKey and keeps every
// observation.
type recorder struct {
	mu  sync.Mutex
	n   map[obsKey]int64
	all []Observation
}

func newRecorder() *recorder { return &recorder{n: map[obsKey]int64{}} }

func (r *recorder) Observe(o Observation) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n[obsKey{o.Kind, o.Result, o.Path, o.Name}] += o.N
	r.all = append(r.all, o)
}

// count returns the sum of N over the observations of kind whose Result
// is r (any result for ResultNone).
func (r *recorder) count(kind ObsKind, res Result) int64 {
	return r.countWhere(func(k obsKey) bool { return k.Kind == kind && (res == ResultNone || k.Result == res) })
}

// countNamed is count for one Name.
func (r *recorder) countNamed(kind ObsKind, res Result, name string) int64 {
	return r.countWhere(func(k obsKey) bool {
		return k.Kind == kind && (res == ResultNone || k.Result == res) && k.Name == name
	})
}

func (r *recorder) countWhere(f func(obsKey) bool) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var n int64
	for k, v := range r.n {
		if f(k) {
			n += v
		}
	}
	return n
}

// of returns the observations of kind, in order.
func (r *recorder) of(kind ObsKind) []Observation {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Observation
	for _, o := range r.all {
		if o.Kind == kind {
			out = append(out, o)
		}
	}
	return out
}

// reset forgets everything seen so far.
func (r *recorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n = map[obsKey]int64{}
	r.all = nil
}

// dump lists the counts, for failure messages.
func (r *recorder) dump() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var lines []string
	for k, v := range r.n {
		lines = append(lines, fmt.Sprintf("%v=%d", k, v))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// requireCount waits up to 5 s for count(kind, res) to reach want (events
// of background work arrive a little later), then requires it equal.
func (r *recorder) requireCount(t *testing.T, want int64, kind ObsKind, res Result) {
	t.Helper()
	require.Eventually(t, func() bool { return r.count(kind, res) >= want }, 5*time.Second, 5*time.Millisecond,
		"%v/%v: want %d, have %d\n%s", kind, res, want, r.count(kind, res), r.dump())
	require.Equal(t, want, r.count(kind, res), "%v/%v\n%s", kind, res, r.dump())
}

func TestObservationNames(t *testing.T) {
	seen := map[string]bool{}
	for k := obsNone + 1; k < obsKinds; k++ {
		name := k.String()
		require.NotContains(t, name, "kind(", "every kind has a name")
		require.False(t, seen[name], "names are unique: %s", name)
		seen[name] = true
	}
	for r := ResultNone + 1; r < results; r++ {
		require.NotContains(t, r.String(), "result(")
		require.NotEmpty(t, r.String())
	}
	for p := PathNone + 1; p < paths; p++ {
		require.NotContains(t, p.String(), "path(")
	}
	require.Equal(t, "cache.request", ObsCacheRequest.String())
	require.Equal(t, "hit", ResultHit.String())
	for _, f := range obsFeatures {
		require.Regexp(t, `^[a-z]+$`, f, "feature names are attribute values")
	}
}

type traceObserver struct {
	*recorder
	spans []Span
}

func (t *traceObserver) StartSpan(ctx context.Context, s Span) (context.Context, func(error)) {
	t.spans = append(t.spans, s)
	return ctx, func(error) {}
}

func (t *traceObserver) InjectTrace(context.Context) string { return "tp" }

type stateRecorder struct {
	*recorder
	breakers []*Breaker
	queues   []*Queue
}

func (s *stateRecorder) ObserveBreaker(b *Breaker) { s.breakers = append(s.breakers, b) }
func (s *stateRecorder) ObserveQueue(q *Queue)     { s.queues = append(s.queues, q) }

func TestObserversFanOut(t *testing.T) {
	require.Nil(t, Observers())
	require.Nil(t, Observers(nil, nil))
	a := newRecorder()
	require.Same(t, a, Observers(nil, a), "one observer is returned as is")

	b, c := newRecorder(), newRecorder()
	tr := &traceObserver{recorder: newRecorder()}
	st := &stateRecorder{recorder: newRecorder()}
	all := Observers(a, Observers(b, c), nil, tr, st)
	all.Observe(Observation{Kind: ObsCacheRequest, Result: ResultHit, N: 2})
	for _, r := range []*recorder{a, b, c, tr.recorder, st.recorder} {
		require.Equal(t, int64(2), r.count(ObsCacheRequest, ResultHit), "every observer sees every observation, nested lists flattened")
	}

	tracer, ok := all.(Tracer)
	require.True(t, ok, "a list with a Tracer traces")
	_, end := tracer.StartSpan(context.Background(), Span{Op: SpanCacheFill})
	end(nil)
	require.Len(t, tr.spans, 1)
	require.Equal(t, "tp", tracer.InjectTrace(context.Background()))
	_, ok = Observers(a, b).(Tracer)
	require.False(t, ok, "a list without one does not")

	so, ok := all.(StateObserver)
	require.True(t, ok)
	so.ObserveBreaker(NewBreaker(BreakerConfig{}))
	require.Len(t, st.breakers, 1, "state goes to the observers that read it")
}

func TestObserveAllocatesNothing(t *testing.T) {
	var sink int64
	obs := Observers(ObserverFunc(func(o Observation) { sink += o.N }), ObserverFunc(func(o Observation) { sink += o.N }))
	b := &backend{obs: obs, feature: "cache"}
	name := "policy"
	allocs := testing.AllocsPerRun(1000, func() {
		b.observe(Observation{Kind: ObsLimitDecision, Result: ResultAllowed, Path: PathRedis, Name: name, N: 1})
	})
	require.Zero(t, allocs)
	require.Positive(t, sink)
}

func TestBreakerObserverAndLogger(t *testing.T) {
	clock := newFakeClock()
	rec := newRecorder()
	b := NewBreaker(BreakerConfig{Failures: 2, Cooldown: time.Second, Clock: clock, Logger: discardLogger(), Observer: rec})
	n := b.node("10.0.0.1:6379")
	for range 2 {
		require.True(t, b.allow(n))
		b.record(n, unhealthy)
	}
	clock.Advance(time.Second)
	require.True(t, b.allow(n))
	b.record(n, healthy)
	var got []string
	for _, o := range rec.of(ObsBreakerChange) {
		require.Equal(t, "10.0.0.1:6379", o.Name)
		got = append(got, o.Result.String())
	}
	require.Equal(t, []string{"open", "half-open", "closed"}, got)

	// An abandoned probe puts the scope back to open, and says so.
	for range 2 {
		b.allow(n)
		b.record(n, unhealthy)
	}
	clock.Advance(time.Second)
	require.True(t, b.allow(n))
	b.record(n, unknown)
	require.Equal(t, BreakerOpen, b.State(n.scope))
	require.Equal(t, "half-open", rec.of(ObsBreakerChange)[4].Result.String())
	require.Equal(t, "open", rec.of(ObsBreakerChange)[5].Result.String())
	require.Len(t, rec.of(ObsBreakerChange), 6)

	// The breaker BreakerFor shares takes the first feature's logger and
	// observer that are set; later ones do not replace them.
	shared := NewBreaker(BreakerConfig{})
	first, second := newRecorder(), newRecorder()
	shared.adopt(nil, nil)
	shared.adopt(discardLogger(), first)
	shared.adopt(nil, second)
	shared.changed("redis", BreakerOpen)
	require.Equal(t, int64(1), first.count(ObsBreakerChange, ResultOpen))
	require.Zero(t, second.count(ObsBreakerChange, ResultNone))
}

func TestRedisCallObserved(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		rec := newRecorder()
		client := r.Client()
		b, err := newBackend("cache", client, Options{Prefix: r.Keys.Prefix(), Observer: rec, Breaker: NewBreaker(BreakerConfig{Logger: discardLogger()}), Logger: discardLogger()})
		require.NoError(t, err)
		ctx := context.Background()
		key := r.Keys.Key("obs")
		require.NoError(t, b.Do(ctx, key, client.B().Set().Key(key).Value("v").Build()).Error())
		for range 3 {
			require.NoError(t, b.DoCache(ctx, key, client.B().Get().Key(key).Cache(), time.Minute).Error())
		}
		calls := rec.of(ObsRedisCall)
		require.Len(t, calls, 2, "the SET and the first GET; the cached GETs are not round trips:\n%s", rec.dump())
		for _, c := range calls {
			require.Equal(t, "cache", c.Name)
			require.Equal(t, ResultOK, c.Result)
			require.Positive(t, c.Duration)
		}

		// A caller that gives up is neither a duration nor an error.
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		_ = b.Do(cctx, key, client.B().Get().Key(key).Build())
		require.Len(t, rec.of(ObsRedisCall), 2)

		// A blocking wait is not a round trip's duration.
		res := b.DoBlocking(ctx, key+"z", client.B().Bzpopmin().Key(key+"z").Timeout(0.01).Build(), 10*time.Millisecond)
		require.True(t, res.Error() == nil || rueidis.IsRedisNil(res.Error()))
		require.Len(t, rec.of(ObsRedisCall), 2)
	})
}
