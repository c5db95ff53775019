package redisecho

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/redisecho/redisecho/internal/redistest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeClock is a Clock that tests move by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestBreakerStateMachine(t *testing.T) {
	clock := newFakeClock()
	b := NewBreaker(BreakerConfig{Failures: 3, Cooldown: time.Second, Clock: clock, Logger: discardLogger()})
	n := b.node("redis")

	for range 2 {
		require.True(t, b.allow(n))
		b.record(n, unhealthy)
	}
	require.Equal(t, BreakerClosed, b.State("redis"), "two failures are below the threshold")
	require.True(t, b.allow(n))
	b.record(n, healthy)
	require.Zero(t, n.run.Load(), "a success ends the run")

	for range 3 {
		require.True(t, b.allow(n))
		b.record(n, unhealthy)
	}
	require.Equal(t, BreakerOpen, b.State("redis"), "three consecutive failures open it")
	require.True(t, b.AnyOpen())
	require.False(t, b.allow(n), "open refuses")

	clock.Advance(999 * time.Millisecond)
	require.False(t, b.allow(n), "still cooling down")
	clock.Advance(time.Millisecond)
	require.True(t, b.allow(n), "the first call after the cool-down is the probe")
	require.Equal(t, BreakerHalfOpen, b.State("redis"))
	require.False(t, b.allow(n), "only one probe at a time")

	b.record(n, unhealthy)
	require.Equal(t, BreakerOpen, b.State("redis"), "a failed probe reopens")
	require.False(t, b.allow(n))

	clock.Advance(time.Second)
	require.True(t, b.allow(n))
	b.record(n, unknown)
	require.Equal(t, BreakerOpen, b.State("redis"), "an abandoned probe proves nothing")
	require.True(t, b.allow(n), "so the next call probes at once")
	b.record(n, healthy)
	require.Equal(t, BreakerClosed, b.State("redis"), "a good probe closes")

	clock.Advance(time.Second)
	require.True(t, b.allow(n))

	st := b.Stats()
	require.Len(t, st, 1)
	assert.Equal(t, "redis", st[0].Scope)
	assert.Equal(t, "closed", st[0].StateName)
	assert.Equal(t, uint64(2), st[0].Successes)
	assert.Equal(t, uint64(6), st[0].Failures)
	assert.Equal(t, uint64(2), st[0].Opened)
}

func TestBreakerStuckProbeIsReplaced(t *testing.T) {
	clock := newFakeClock()
	b := NewBreaker(BreakerConfig{Failures: 1, Cooldown: time.Second, Clock: clock, Logger: discardLogger()})
	n := b.node("redis")
	b.record(n, unhealthy)
	clock.Advance(time.Second)
	require.True(t, b.allow(n), "probe that will never report")
	require.False(t, b.allow(n))
	clock.Advance(time.Second)
	require.True(t, b.allow(n), "a probe silent for a cool-down is replaced")
}

func TestBreakerConcurrentUse(t *testing.T) {
	b := NewBreaker(BreakerConfig{Failures: 50, Logger: discardLogger()})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 1000 {
				n := b.node(fmt.Sprint("s", (i+j)%3))
				if b.allow(n) {
					b.record(n, outcome((i+j)%2))
				}
			}
		})
	}
	wg.Wait()
	require.Len(t, b.Stats(), 3)
}

func TestNewBreakerRejectsNegativeValues(t *testing.T) {
	require.PanicsWithError(t, fmt.Errorf("%w: %+v", ErrInvalidBreaker, BreakerConfig{Failures: -1}).Error(), func() {
		NewBreaker(BreakerConfig{Failures: -1})
	})
}

func TestClassify(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	live := context.Background()
	tests := []struct {
		name   string
		parent context.Context
		given  error
		want   outcome
	}{
		{name: "success", parent: live, given: nil, want: healthy},
		{name: "nil reply", parent: live, given: rueidis.Nil, want: healthy},
		{name: "own deadline", parent: live, given: context.DeadlineExceeded, want: unhealthy},
		{name: "client went away", parent: canceled, given: context.Canceled, want: unknown},
		{name: "client went away while Redis timed out", parent: canceled, given: context.DeadlineExceeded, want: unknown},
		{name: "network error", parent: live, given: &net.OpError{Op: "dial", Err: errors.New("connection refused")}, want: unhealthy},
		{name: "client closing", parent: live, given: rueidis.ErrClosing, want: unhealthy},
		{name: "io eof", parent: live, given: io.EOF, want: unhealthy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, classify(tt.parent, tt.given))
		})
	}
}

// TestClassifyRedisReplies uses real error replies: a WRONGTYPE proves Redis
// is up, a BUSY script does not.
func TestClassifyRedisReplies(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		k := r.Keys.Key("list")
		require.NoError(t, c.Do(ctx, c.B().Lpush().Key(k).Element("x").Build()).Error())
		err := c.Do(ctx, c.B().Get().Key(k).Build()).Error()
		require.Error(t, err)
		assert.Equal(t, healthy, classify(ctx, err), "WRONGTYPE: %v", err)
	})
}

func TestNewBackendValidates(t *testing.T) {
	c := standaloneClient(t)
	tests := []struct {
		name    string
		client  rueidis.Client
		given   Options
		wantErr error
	}{
		{name: "nil client", given: Options{}, wantErr: ErrNilClient},
		{name: "brace in prefix", client: c, given: Options{Prefix: "a{b}"}, wantErr: ErrInvalidPrefix},
		{name: "negative timeout", client: c, given: Options{Timeout: -time.Second}, wantErr: ErrInvalidTimeout},
		{name: "client type not comparable", client: uncomparableClient{Client: c}, given: Options{}, wantErr: ErrClientNotComparable},
		{name: "defaults", client: c, given: Options{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := newBackend("test", tt.client, tt.given)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, DefaultTimeout, b.timeout)
			assert.Equal(t, DefaultPrefix, b.keys.Prefix())
			assert.Same(t, BreakerFor(c), b.breaker, "features on one client share a breaker")
		})
	}
}

// uncomparableClient wraps a client with a func, as an app's decorator
// might: it cannot be a map key.
type uncomparableClient struct {
	rueidis.Client
	_ func()
}

func TestUncomparableClientDoesNotPanic(t *testing.T) {
	c := uncomparableClient{Client: standaloneClient(t)}
	require.NotPanics(t, func() { _ = BreakerFor(c) })
	_, err := NewSessionStore(SessionConfig{Client: c, Keys: []string{strings.Repeat("k", 32)}})
	require.ErrorIs(t, err, ErrClientNotComparable)
	_, err = NewSessionStore(SessionConfig{Client: &c, Keys: []string{strings.Repeat("k", 32)}})
	require.NoError(t, err, "a pointer to the wrapper works")
}

func standaloneClient(t *testing.T) rueidis.Client {
	return newTestRedis(t, standaloneRedis.name, standaloneRedis.addrs).Client()
}

// faultBackend returns a backend on a dedicated deployment with a fast
// breaker (2 failures) on a fake clock.
func faultBackend(t *testing.T, f *faultRedis, clock *fakeClock) (*backend, rueidis.Client) {
	return faultBackendTimeout(t, f, clock, 200*time.Millisecond)
}

func faultBackendTimeout(t *testing.T, f *faultRedis, clock *fakeClock, timeout time.Duration) (*backend, rueidis.Client) {
	c := f.Client()
	br := NewBreaker(BreakerConfig{Failures: 2, Cooldown: 10 * time.Second, Clock: clock, Logger: discardLogger()})
	b, err := newBackend("test", c, Options{Prefix: f.Keys.Prefix(), Timeout: timeout, Breaker: br, Clock: clock, Logger: discardLogger()})
	require.NoError(t, err)
	return b, c
}

// waitSlotMap waits until the backend resolves key to a node address, which
// on a cluster needs the slot map that loads in the background.
func waitSlotMap(t *testing.T, b *backend, key string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for b.scope(key) == "cluster" {
		if time.Now().After(deadline) {
			var err any = "no error recorded"
			if e := b.shared.slotsErr.Load(); e != nil {
				err = *e
			}
			t.Fatalf("the cluster's slot map never loaded: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return b.scope(key)
}

func TestBackendDeadlineAndBreakerOnPausedServer(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		clock := newFakeClock()
		b, c := faultBackend(t, f, clock)
		key := b.keys.Key("k")
		get := func() error {
			return b.Do(context.Background(), key, c.B().Get().Key(key).Build()).Error()
		}
		require.True(t, rueidis.IsRedisNil(get()))
		scope := waitSlotMap(t, b, key)

		f.Pause(t)
		for range 2 {
			start := time.Now()
			require.ErrorIs(t, get(), context.DeadlineExceeded)
			require.Less(t, time.Since(start), 2*time.Second, "the deadline bounds a call to a hung server")
		}
		require.Equal(t, BreakerOpen, b.breaker.State(scope))

		start := time.Now()
		require.ErrorIs(t, get(), ErrBreakerOpen)
		require.Less(t, time.Since(start), 150*time.Millisecond, "an open breaker sends nothing (the deadline is 200 ms)")

		f.Resume(t)
		clock.Advance(10 * time.Second)
		require.Eventually(t, func() bool { return get() != nil && rueidis.IsRedisNil(get()) }, 10*time.Second, 20*time.Millisecond)
		require.Equal(t, BreakerClosed, b.breaker.State(scope), "a successful probe closes the breaker")
	})
}

func TestBackendBreakerOnStoppedServer(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		clock := newFakeClock()
		b, c := faultBackend(t, f, clock)
		key := b.keys.Key("k")
		set := func() error {
			return b.Do(context.Background(), key, c.B().Set().Key(key).Value("v").Build()).Error()
		}
		require.NoError(t, set())
		scope := waitSlotMap(t, b, key)

		f.Stop(t)
		require.Eventually(t, func() bool {
			_ = set()
			return b.breaker.State(scope) == BreakerOpen
		}, 10*time.Second, 10*time.Millisecond)
		require.ErrorIs(t, set(), ErrBreakerOpen)

		f.Start(t)
		require.Eventually(t, func() bool {
			clock.Advance(10 * time.Second)
			return set() == nil
		}, 20*time.Second, 50*time.Millisecond, "the breaker recovers after the server restarts")
		require.Equal(t, BreakerClosed, b.breaker.State(scope))
	})
}

func TestBackendSurvivesKilledConnections(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		clock := newFakeClock()
		b, c := faultBackend(t, f, clock)
		key := b.keys.Key("k")
		for range 5 {
			f.KillConnections(t)
			require.Eventually(t, func() bool {
				clock.Advance(10 * time.Second) // a blip may open the breaker; the next probe closes it
				return b.Do(context.Background(), key, c.B().Incr().Key(key).Build()).Error() == nil
			}, 5*time.Second, 10*time.Millisecond)
			require.Equal(t, BreakerClosed, b.breaker.State(b.scope(key)), "a success after the blip closes the breaker")
		}
	})
}

// TestClientCancellationsDoNotTripBreaker: clients that disconnect while Redis
// hangs must not switch the feature off for everyone.
func TestClientCancellationsDoNotTripBreaker(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		clock := newFakeClock()
		// A deadline far beyond the cancellations, so that only they end the calls.
		b, c := faultBackendTimeout(t, f, clock, 2*time.Second)
		key := b.keys.Key("k")
		require.True(t, rueidis.IsRedisNil(b.Do(context.Background(), key, c.B().Get().Key(key).Build()).Error()))
		scope := waitSlotMap(t, b, key)

		f.Pause(t)
		var wg sync.WaitGroup
		for range 10 {
			wg.Go(func() {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(20*time.Millisecond, cancel)
				assert.Error(t, b.Do(ctx, key, c.B().Get().Key(key).Build()).Error())
			})
		}
		wg.Wait()
		require.Equal(t, BreakerClosed, b.breaker.State(scope))
		require.Zero(t, b.breaker.node(scope).run.Load())
		f.Resume(t)
	})
}

// TestBreakerIsPerNodeOnCluster: a paused master opens only its own scope;
// keys on the other masters keep working.
func TestBreakerIsPerNodeOnCluster(t *testing.T) {
	t.Parallel()
	f := newFaultRedis(t, "cluster")
	clock := newFakeClock()
	b, c := faultBackend(t, f, clock)
	// One key per master.
	byNode := map[string]string{}
	for i := 0; len(byNode) < 3 && i < 1000; i++ {
		k := b.keys.Key("k", fmt.Sprint(i))
		byNode[waitSlotMap(t, b, k)] = k
	}
	require.Len(t, byNode, 3)
	paused := f.Servers()[0]
	f.Pause(t, paused)
	for range 2 {
		for _, k := range byNode {
			_ = b.Do(context.Background(), k, c.B().Set().Key(k).Value("v").Build()).Error()
		}
	}
	for addr, k := range byNode {
		err := b.Do(context.Background(), k, c.B().Set().Key(k).Value("v").Build()).Error()
		if addr == paused.addr() {
			require.ErrorIs(t, err, ErrBreakerOpen)
			require.Equal(t, BreakerOpen, b.breaker.State(addr))
		} else {
			require.NoError(t, err, "keys on healthy masters keep working")
			require.Equal(t, BreakerClosed, b.breaker.State(addr))
		}
	}
	f.Resume(t, paused)
}

func TestCacheCheckWarnsWhenClientSideCachingIsOff(t *testing.T) {
	tests := []struct {
		name     string
		opt      func(*rueidis.ClientOption)
		wantWarn bool
	}{
		{name: "default client caches", opt: func(*rueidis.ClientOption) {}, wantWarn: false},
		{name: "DisableCache", opt: func(o *rueidis.ClientOption) { o.DisableCache = true }, wantWarn: true},
		{name: "RESP2", opt: func(o *rueidis.ClientOption) { o.AlwaysRESP2, o.DisableCache = true, true }, wantWarn: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			forEachTopology(t, func(t *testing.T, r *testRedis) {
				c := r.Client(tt.opt)
				var logs redistest.SyncBuffer
				b, err := newBackend("test", c, Options{Prefix: r.Keys.Prefix(), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
				require.NoError(t, err)
				key := b.keys.Key("x")
				require.True(t, rueidis.IsRedisNil(b.Do(context.Background(), key, c.B().Get().Key(key).Build()).Error()))
				if tt.wantWarn {
					require.Eventually(t, b.shared.cacheOff.Load, 5*time.Second, 10*time.Millisecond)
					require.Contains(t, logs.String(), "client-side caching is off")
					return
				}
				time.Sleep(200 * time.Millisecond)
				require.False(t, b.shared.cacheOff.Load())
				require.NotContains(t, logs.String(), "client-side caching is off")
			})
		})
	}
}

func TestRateLogSuppressesRepeats(t *testing.T) {
	var logs redistest.SyncBuffer
	clock := newFakeClock()
	l := &rateLog{logger: slog.New(slog.NewTextHandler(&logs, nil)), clock: clock}
	for range 5 {
		l.Error("redis failed", errors.New("boom"))
	}
	clock.Advance(time.Second)
	l.Error("redis failed", errors.New("boom"))
	out := logs.String()
	require.Equal(t, 2, bytes.Count([]byte(out), []byte("redis failed")))
	require.Contains(t, out, "suppressed=4")
}

// TestBackendUnderOOM: a full Redis (noeviction) answers reads and refuses
// writes. Cached reads keep working (rueidis's tracked miss is a MULTI, which
// Redis 7.0 refuses under OOM, so the backend reads untracked), OOM replies
// do not open the breaker, and the node's OOM state clears on the next
// successful write or after oomHold.
func TestBackendUnderOOM(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ctx := context.Background()
		clock := newFakeClock()
		b, c := faultBackend(t, f, clock)
		cached, plain := b.keys.Key("cached"), b.keys.Key("plain")
		for _, k := range []string{cached, plain} {
			require.NoError(t, b.Do(ctx, k, c.B().Set().Key(k).Value("v:"+k).Build()).Error())
		}
		get := func(k string) (string, error) {
			return b.DoCache(ctx, k, c.B().Get().Key(k).Cache().Pin(), time.Minute).ToString()
		}
		v, err := get(cached)
		require.NoError(t, err)
		require.Equal(t, "v:"+cached, v)
		scope := waitSlotMap(t, b, plain)

		f.Fill(t)
		for range 10 {
			err := b.Do(ctx, plain, c.B().Set().Key(plain).Value("new").Build()).Error()
			require.True(t, isOOM(err), "a write into a full Redis: %v", err)
		}
		require.Equal(t, BreakerClosed, b.breaker.State(scope), "OOM replies prove Redis answers: they do not open the breaker")
		require.True(t, b.OOM(plain))

		for _, k := range []string{cached, plain} {
			v, err := get(k)
			require.NoError(t, err, "a cached read of %s under OOM", k)
			require.Equal(t, "v:"+k, v, "nothing was half-written")
		}
		res := b.DoMultiCache(ctx, plain, rueidis.CT(c.B().Get().Key(plain).Cache(), time.Minute))
		v, err = res[0].ToString()
		require.NoError(t, err)
		require.Equal(t, "v:"+plain, v)

		code, rep, _ := getHealth(t, ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: b.breaker}))
		require.Equal(t, http.StatusOK, code, "reads work: readiness stays 200")
		require.Equal(t, "oom", rep.Redis.State)
		code, rep, _ = getHealth(t, ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: b.breaker, UnavailableWhenOOM: true}))
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Equal(t, "oom", rep.Redis.State)
		require.True(t, b.breaker.Stats()[0].OOM || len(b.breaker.Stats()) > 1)

		require.NoError(t, b.Do(ctx, cached, c.B().Del().Key(b.keys.Key("nothing")).Build()).Error())
		require.True(t, b.OOM(plain), "a DEL works in a full Redis: it proves nothing")

		clock.Advance(oomHold)
		require.False(t, b.OOM(plain), "the OOM state lapses after oomHold")
		require.Error(t, b.Do(ctx, plain, c.B().Set().Key(plain).Value("new").Build()).Error())
		require.True(t, b.OOM(plain), "and is set again by the next OOM reply")

		f.Free(t)
		require.NoError(t, b.Do(ctx, plain, c.B().Get().Key(plain).Build()).Error())
		require.True(t, b.OOM(plain), "a read does not prove that writes work again")
		require.NoError(t, b.Do(ctx, plain, c.B().Set().Key(plain).Value("new").Build()).Error())
		require.False(t, b.OOM(plain), "a successful write clears the OOM state")
		code, rep, _ = getHealth(t, ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: b.breaker}))
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "up", rep.Redis.State)
	})
}

// TestCacheHitsDoNotCloseTheBreaker: a hit is served from process memory and
// says nothing about Redis, so it is not reported, and a half-open scope's
// probe of a cached read goes to Redis instead of being a hit.
func TestCacheHitsDoNotCloseTheBreaker(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		ctx := context.Background()
		clock := newFakeClock()
		b, c := faultBackend(t, f, clock)
		k := b.keys.Key("hot")
		require.NoError(t, b.Do(ctx, k, c.B().Set().Key(k).Value("v").Build()).Error())
		get := c.B().Get().Key(k).Cache().Pin()
		require.NoError(t, b.DoCache(ctx, k, get, time.Minute).Error())
		require.Eventually(t, func() bool { return b.DoCache(ctx, k, get, time.Minute).IsCacheHit() }, 5*time.Second, 10*time.Millisecond)
		scope := waitSlotMap(t, b, k)
		n := b.breaker.node(scope)
		before := n.successes.Load()

		f.Pause(t)
		for b.breaker.State(scope) != BreakerOpen {
			require.Error(t, b.Do(ctx, k, c.B().Get().Key(k).Build()).Error())
		}
		clock.Advance(10 * time.Second) // the cool-down has passed: the next call probes
		res := b.DoCache(ctx, k, get, time.Minute)
		require.ErrorIs(t, res.Error(), context.DeadlineExceeded, "the probe of a cached read is a round trip, not a hit from memory")
		require.Equal(t, before, n.successes.Load(), "nothing counted as a success")
		require.Equal(t, BreakerOpen, b.breaker.State(scope), "the failed probe reopens the scope")
	})
}

// TestReadinessFailuresFeedTheBreaker: a readiness PING that times out counts
// against the node, so an instance whose reads are all cache hits still
// learns that Redis is gone.
func TestReadinessFailuresFeedTheBreaker(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		c := f.Client()
		br := NewBreaker(BreakerConfig{Failures: 2, Cooldown: 10 * time.Second, Logger: discardLogger()})
		h := ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: br, Timeout: 300 * time.Millisecond})
		code, _, _ := getHealth(t, h)
		require.Equal(t, http.StatusOK, code)
		f.Pause(t, f.Servers()[0])
		for range 2 {
			code, _, _ = getHealth(t, h)
			require.Equal(t, http.StatusServiceUnavailable, code)
		}
		require.True(t, br.AnyOpen(), "two failed PINGs open the node's scope: %+v", br.Stats())
		if f.Topology == "cluster" {
			open := 0
			for _, s := range br.Stats() {
				if s.State == BreakerOpen {
					open++
					require.Equal(t, f.Servers()[0].addr(), s.Scope, "only the paused master's scope")
				}
			}
			require.Equal(t, 1, open)
		}
	})
}

// TestReadinessSeesAFullRedis: readiness reads INFO memory with its probe,
// so a full Redis (noeviction, maxmemory reached) reads "oom" before any
// write was refused.
func TestReadinessSeesAFullRedis(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		c := f.Client()
		br := NewBreaker(BreakerConfig{Logger: discardLogger()})
		h := ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: br})
		_, rep, _ := getHealth(t, h)
		require.Equal(t, "up", rep.Redis.State)
		f.Fill(t, f.Servers()[0])
		code, rep, _ := getHealth(t, h)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "oom", rep.Redis.State)
		code, _, _ = getHealth(t, ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: br, UnavailableWhenOOM: true}))
		require.Equal(t, http.StatusServiceUnavailable, code)
		f.Free(t)
		_, err := respDo(f.Servers()[0].addr(), 2*time.Second, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
		require.NoError(t, err)
		_, err = respDo(f.Servers()[0].addr(), 2*time.Second, "CONFIG", "SET", "maxmemory", "1")
		require.NoError(t, err, "a limit reached under an evicting policy is not full")
		time.Sleep(oomHold) // the mark of the last probe lapses
		_, rep, _ = getHealth(t, h)
		require.Equal(t, "up", rep.Redis.State)
	})
}

// TestHalfOpenProbeIsARoundTripForCachedReads: while a scope is not closed,
// cached reads go to Redis, so that the half-open probe's success closes
// the scope; a hit would report nothing and leave it half-open for good,
// refusing every other call.
func TestHalfOpenProbeIsARoundTripForCachedReads(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		clock := newFakeClock()
		c := r.Client()
		br := NewBreaker(BreakerConfig{Failures: 1, Cooldown: time.Second, Clock: clock, Logger: discardLogger()})
		b, err := newBackend("test", c, Options{Prefix: r.Keys.Prefix(), Breaker: br, Clock: clock, Logger: discardLogger()})
		require.NoError(t, err)
		k := b.keys.Key("hot")
		require.NoError(t, b.Do(ctx, k, c.B().Set().Key(k).Value("v").Build()).Error())
		get := c.B().Get().Key(k).Cache().Pin()
		require.Eventually(t, func() bool { return b.DoCache(ctx, k, get, time.Minute).IsCacheHit() }, 5*time.Second, 10*time.Millisecond)
		scope := waitSlotMap(t, b, k)

		br.record(br.node(scope), unhealthy) // a failed readiness probe, say
		require.Equal(t, BreakerOpen, br.State(scope))
		require.ErrorIs(t, b.DoCache(ctx, k, get, time.Minute).Error(), ErrBreakerOpen)
		clock.Advance(2 * time.Second)
		res := b.DoCache(ctx, k, get, time.Minute)
		require.NoError(t, res.Error())
		require.False(t, res.IsCacheHit(), "the probe goes to Redis")
		require.Equal(t, BreakerClosed, br.State(scope), "and closes the scope")
		require.Eventually(t, func() bool { return b.DoCache(ctx, k, get, time.Minute).IsCacheHit() }, 5*time.Second, 10*time.Millisecond, "hits again once closed")
	})
}

// TestReadinessClosesTheScopeItOpened: failed readiness probes open a node's
// scope; once Redis answers again and the cool-down has passed, a readiness
// probe that works is the half-open probe and closes it. Without that, an
// instance the load balancer took out of rotation (readiness 503, so no
// traffic, so no call to probe the scope) would stay out for good.
func TestReadinessClosesTheScopeItOpened(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		c := f.Client()
		clock := newFakeClock()
		br := NewBreaker(BreakerConfig{Failures: 2, Cooldown: 10 * time.Second, Clock: clock, Logger: discardLogger()})
		h := ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: br, Timeout: 300 * time.Millisecond})
		f.Pause(t, f.Servers()[0])
		for range 2 {
			code, _, _ := getHealth(t, h)
			require.Equal(t, http.StatusServiceUnavailable, code)
		}
		require.True(t, br.AnyOpen())
		f.Resume(t, f.Servers()[0])
		code, rep, _ := getHealth(t, h)
		require.Equal(t, http.StatusServiceUnavailable, code, "during the cool-down the scope stays open")
		require.Equal(t, "breaker-open", rep.Redis.State)
		clock.Advance(10 * time.Second)
		code, rep, _ = getHealth(t, h)
		require.Equal(t, http.StatusOK, code, "the probe after the cool-down closes the scope: %+v", rep)
		require.Equal(t, "up", rep.Redis.State)
		require.False(t, br.AnyOpen(), "%+v", br.Stats())
	})
}

// comparableWrapper is comparable by type, but holds a value that is not:
// using it as a map key would panic at run time.
type comparableWrapper struct{ rueidis.Client }

func TestWrappedUncomparableClientIsRefused(t *testing.T) {
	c := comparableWrapper{Client: uncomparableClient{Client: standaloneClient(t)}}
	require.NotPanics(t, func() { _ = BreakerFor(c) })
	require.NotPanics(t, func() {
		_, err := NewSessionStore(SessionConfig{Client: c, Keys: []string{strings.Repeat("k", 32)}})
		require.ErrorIs(t, err, ErrClientNotComparable)
	})
}

// TestReadinessLeavesReplicasOut: on a cluster with a replica, a replica
// that stops answering neither turns readiness to 503 nor opens a breaker
// scope (no call ever goes to it): only masters count.
func TestReadinessLeavesReplicasOut(t *testing.T) {
	t.Parallel()
	f := newFaultRedis(t, "cluster")
	master := f.Servers()[0]
	replica, err := redistest.NewServer(true)
	require.NoError(t, err)
	require.NoError(t, replica.Start())
	t.Cleanup(replica.Stop)
	_, err = respDo(master.addr(), 2*time.Second, "CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(replica.Port()))
	require.NoError(t, err)
	id, err := respDo(master.addr(), 2*time.Second, "CLUSTER", "MYID")
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		_, err := respDo(replica.Addr(), 2*time.Second, "CLUSTER", "REPLICATE", id.(string))
		return err == nil
	}, 10*time.Second, 50*time.Millisecond, "the replica learns its master")
	c := f.Client(func(o *rueidis.ClientOption) { o.ClusterOption.ShardsRefreshInterval = 100 * time.Millisecond })
	require.Eventually(t, func() bool { _, ok := c.Nodes()[replica.Addr()]; return ok }, 10*time.Second, 50*time.Millisecond,
		"the client sees the replica")

	br := NewBreaker(BreakerConfig{Failures: 2, Cooldown: 10 * time.Second, Logger: discardLogger()})
	h := ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: br, Timeout: 300 * time.Millisecond, Detail: true})
	require.Eventually(t, func() bool {
		stateOf(c).refreshSlots(c, time.Second) // as the first call of a feature does
		code, _, _ := getHealth(t, h)
		return code == http.StatusOK && stateOf(c).slots.Load() != nil
	}, 10*time.Second, 50*time.Millisecond, "the slot map is read")

	require.NoError(t, replica.Pause())
	t.Cleanup(func() { _ = replica.Resume() })
	for range 2 {
		code, rep, _ := getHealth(t, h)
		require.Equal(t, http.StatusOK, code, "a paused replica: %+v", rep)
		require.Len(t, rep.Redis.Nodes, 3, "masters only")
	}
	require.False(t, br.AnyOpen(), "%+v", br.Stats())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ms, err := masters(ctx, c)
	require.NoError(t, err, "SCANs (cache Flush) go on without the replica")
	require.Len(t, ms, 3)
}

// TestReadinessCountsAMasterTheClientDropped: with CLUSTER SHARDS (Redis 8,
// or PreferClusterShards), rueidis drops a failed master from its topology,
// so Nodes() no longer lists it. Readiness still reports it down: the slot
// map says its slots have no other master.
func TestReadinessCountsAMasterTheClientDropped(t *testing.T) {
	t.Parallel()
	f := newFaultRedis(t, "cluster")
	c := f.Client(func(o *rueidis.ClientOption) {
		o.ClusterOption.PreferClusterShards = true
		o.ClusterOption.ShardsRefreshInterval = 100 * time.Millisecond
	})
	br := NewBreaker(BreakerConfig{Failures: 1000, Logger: discardLogger()})
	h := ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: br, Timeout: 300 * time.Millisecond})
	require.Eventually(t, func() bool {
		stateOf(c).refreshSlots(c, time.Second)
		code, _, _ := getHealth(t, h)
		return code == http.StatusOK && stateOf(c).slots.Load() != nil
	}, 10*time.Second, 50*time.Millisecond)
	dead := f.Servers()[0]
	f.Stop(t, dead)
	require.Eventually(t, func() bool { _, ok := c.Nodes()[dead.addr()]; return !ok }, 20*time.Second, 50*time.Millisecond,
		"rueidis drops the failed master")
	code, rep, _ := getHealth(t, h)
	require.Equal(t, http.StatusServiceUnavailable, code, "%+v", rep)
	require.Equal(t, "down", rep.Redis.State)
}

// TestSlotEndpoint: the slot map names nodes as rueidis's Nodes() does, or
// readiness and calls would feed different scopes of one node.
func TestSlotEndpoint(t *testing.T) {
	tests := []struct {
		host string
		port int64
		want string
	}{
		{host: "127.0.0.1", port: 7000, want: "127.0.0.1:7000"},
		{host: "::1", port: 7000, want: "[::1]:7000"},
		{host: "redis-0.redis", port: 6379, want: "redis-0.redis:6379"},
		{host: "", port: 7000, want: ""},
		{host: "?", port: 7000, want: ""},
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, slotEndpoint(tt.host, tt.port), "%q", tt.host)
	}
}
