package redisecho

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

// blockingBackend returns a backend on r's client c with a breaker of its
// own, so that its Stats count only the test's calls.
func blockingBackend(t *testing.T, r *testRedis, c rueidis.Client) *backend {
	t.Helper()
	br := NewBreaker(BreakerConfig{Logger: discardLogger()})
	b, err := newBackend("test", c, Options{Prefix: r.Keys.Prefix(), Breaker: br, Logger: discardLogger()})
	require.NoError(t, err)
	return b
}

// breakerTotals sums the breaker's stats over its scopes.
func breakerTotals(b *Breaker) (total BreakerStats) {
	for _, s := range b.Stats() {
		total.Successes += s.Successes
		total.Failures += s.Failures
		total.Rejected += s.Rejected
		total.Opened += s.Opened
		total.ConsecutiveFailures += s.ConsecutiveFailures
		if s.State != BreakerClosed {
			total.State = s.State
		}
	}
	return total
}

// nodeOfKey returns the address of the server that holds key: the
// standalone server, or the cluster master of key's slot.
func nodeOfKey(t *testing.T, b *backend, addrs []string, key string) string {
	t.Helper()
	if b.client.Mode() != rueidis.ClientModeCluster {
		return addrs[0]
	}
	return waitSlotMap(t, b, key)
}

// clientEntry is one connection in CLIENT LIST.
type clientEntry struct{ id, flags, cmd string }

// clientsNamed returns the connections of the server at addr whose client
// name is name, by id.
func clientsNamed(t *testing.T, addr, name string) map[string]clientEntry {
	t.Helper()
	out, err := respDo(addr, 2*time.Second, "CLIENT", "LIST")
	require.NoError(t, err)
	list, ok := out.(string)
	require.True(t, ok, "CLIENT LIST reply %T", out)
	got := map[string]clientEntry{}
	for _, line := range strings.Split(strings.TrimSpace(list), "\n") {
		f := map[string]string{}
		for _, kv := range strings.Fields(line) {
			k, v, _ := strings.Cut(kv, "=")
			f[k] = v
		}
		if f["name"] == name {
			got[f["id"]] = clientEntry{id: f["id"], flags: f["flags"], cmd: f["cmd"]}
		}
	}
	return got
}

// blockedIn waits until a connection named name is blocked in cmd on the
// server at addr, and returns its id.
func blockedIn(t *testing.T, addr, name, cmd string) string {
	t.Helper()
	var id string
	require.Eventually(t, func() bool {
		for _, e := range clientsNamed(t, addr, name) {
			if e.cmd == cmd && strings.Contains(e.flags, "b") {
				id = e.id
				return true
			}
		}
		return false
	}, 5*time.Second, 10*time.Millisecond, "no connection named %s blocked in %s", name, cmd)
	return id
}

func uniqueName(prefix string) string {
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	return prefix + hex.EncodeToString(rnd[:])
}

// TestDoBlockingIdleKeepsBreakerClosed: an idle worker waits on its marker
// for more than 10 s, one server timeout after the other, and the breaker
// sees only successes.
func TestDoBlockingIdleKeepsBreakerClosed(t *testing.T) {
	t.Parallel()
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		t.Parallel()
		c := r.Client()
		b := blockingBackend(t, r, c)
		key := r.Keys.Key("marker")
		calls := 0
		for start := time.Now(); time.Since(start) < 10500*time.Millisecond; calls++ {
			res := b.DoBlocking(context.Background(), key, c.B().Bzpopmin().Key(key).Timeout(1).Build(), time.Second)
			require.True(t, rueidis.IsRedisNil(res.Error()), "the server timeout answers nil, got %v", res.Error())
		}
		got := breakerTotals(b.breaker)
		require.Equal(t, BreakerClosed, got.State)
		require.Zero(t, got.Failures)
		require.Zero(t, got.Opened)
		require.Zero(t, got.ConsecutiveFailures)
		require.EqualValues(t, calls, got.Successes, "every server timeout is a success")
	})
}

// TestDoBlockingWakesOnPush: a ZADD from another client ends the wait with
// the member pushed.
func TestDoBlockingWakesOnPush(t *testing.T) {
	t.Parallel()
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		name := uniqueName("blk-wake-")
		c := r.Client(func(o *rueidis.ClientOption) { o.ClientName = name })
		b := blockingBackend(t, r, c)
		key := r.Keys.Key("marker")
		addr := nodeOfKey(t, b, r.addrs, key)

		done := make(chan rueidis.RedisResult, 1)
		go func() {
			done <- b.DoBlocking(context.Background(), key, c.B().Bzpopmin().Key(key).Timeout(5).Build(), 5*time.Second)
		}()
		blockedIn(t, addr, name, "bzpopmin")

		pusher := r.Client()
		pushed := time.Now()
		require.NoError(t, pusher.Do(context.Background(), pusher.B().Zadd().Key(key).ScoreMember().ScoreMember(1, "job").Build()).Error())
		var res rueidis.RedisResult
		select {
		case res = <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("the push did not wake the blocked call")
		}
		require.Less(t, time.Since(pushed), 2*time.Second, "woken by the push, not by the server timeout")
		reply, err := res.ToArray()
		require.NoError(t, err)
		require.Len(t, reply, 3)
		member, err := reply[1].ToString()
		require.NoError(t, err)
		require.Equal(t, "job", member)
		require.Zero(t, breakerTotals(b.breaker).Failures)
	})
}

// TestDoBlockingCancelKeepsConnection: the caller cancelling mid-block gets
// its answer at once, the breaker does not count it, and rueidis unblocks
// the connection (CLIENT UNBLOCK) instead of closing it, with or without
// auto-pipelining (DoBlocking adds ToPipe for the latter).
func TestDoBlockingCancelKeepsConnection(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opt  func(*rueidis.ClientOption)
	}{
		{name: "auto-pipelining", opt: func(*rueidis.ClientOption) {}},
		{name: "DisableAutoPipelining", opt: func(o *rueidis.ClientOption) { o.DisableAutoPipelining = true }},
	}
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				name := uniqueName("blk-cancel-")
				c := r.Client(tt.opt, func(o *rueidis.ClientOption) { o.ClientName = name })
				b := blockingBackend(t, r, c)
				key := r.Keys.Key("marker", tt.name)
				addr := nodeOfKey(t, b, r.addrs, key)
				before := breakerTotals(b.breaker)

				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan rueidis.RedisResult, 1)
				go func() {
					done <- b.DoBlocking(ctx, key, c.B().Bzpopmin().Key(key).Timeout(5).Build(), 5*time.Second)
				}()
				id := blockedIn(t, addr, name, "bzpopmin")

				cancelled := time.Now()
				cancel()
				var res rueidis.RedisResult
				select {
				case res = <-done:
				case <-time.After(3 * time.Second):
					t.Fatal("cancelling ctx did not end the blocked call")
				}
				require.Less(t, time.Since(cancelled), time.Second, "a cancel returns promptly")
				require.ErrorIs(t, res.Error(), context.Canceled)
				after := breakerTotals(b.breaker)
				require.Equal(t, before, after, "a cancel is not recorded")

				require.Eventually(t, func() bool {
					e, ok := clientsNamed(t, addr, name)[id]
					return ok && !strings.Contains(e.flags, "b")
				}, 5*time.Second, 10*time.Millisecond, "the connection is unblocked and stays open")

				// The client keeps working, the blocking call included.
				require.True(t, rueidis.IsRedisNil(b.Do(context.Background(), key, c.B().Get().Key(key).Build()).Error()))
				require.NoError(t, c.Do(context.Background(), c.B().Zadd().Key(key).ScoreMember().ScoreMember(1, "job").Build()).Error())
				res = b.DoBlocking(context.Background(), key, c.B().Bzpopmin().Key(key).Timeout(1).Build(), time.Second)
				require.NoError(t, res.Error())
				_, ok := clientsNamed(t, addr, name)[id]
				require.True(t, ok, "the unblocked connection was not closed")
				require.Zero(t, breakerTotals(b.breaker).Failures)
			})
		}
	})
}

// TestDoBlockingOnPausedServer: a hung server fails the call at its own
// deadline (server timeout + 250 ms + Timeout), which counts as a failure;
// enough of them open the breaker, which then refuses without sending.
func TestDoBlockingOnPausedServer(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		clock := newFakeClock()
		b, c := faultBackend(t, f, clock) // Timeout 200 ms, opens after 2 failures
		key := b.keys.Key("marker")
		wait := func() error {
			return b.DoBlocking(context.Background(), key, c.B().Bzpopmin().Key(key).Timeout(1).Build(), time.Second).Error()
		}
		res := b.DoBlocking(context.Background(), key, c.B().Bzpopmin().Key(key).Timeout(0.05).Build(), 50*time.Millisecond)
		require.True(t, rueidis.IsRedisNil(res.Error()), "warm-up: %v", res.Error())
		scope := waitSlotMap(t, b, key)

		f.Pause(t)
		for i := range 2 {
			start := time.Now()
			require.ErrorIs(t, wait(), context.DeadlineExceeded)
			took := time.Since(start)
			require.GreaterOrEqual(t, took, time.Second+blockingGrace+200*time.Millisecond, "not before its own deadline")
			require.Less(t, took, 5*time.Second, "the deadline bounds a call to a hung server")
			require.EqualValues(t, i+1, b.breaker.node(scope).failed.Load(), "its own deadline passing is a failure")
		}
		require.Equal(t, BreakerOpen, b.breaker.State(scope))

		start := time.Now()
		require.ErrorIs(t, wait(), ErrBreakerOpen)
		require.Less(t, time.Since(start), 500*time.Millisecond, "an open breaker sends nothing")
		require.EqualValues(t, 1, b.breaker.node(scope).rejected.Load())

		f.Resume(t)
		clock.Advance(10 * time.Second)
		require.Eventually(t, func() bool {
			err := b.DoBlocking(context.Background(), key, c.B().Bzpopmin().Key(key).Timeout(0.05).Build(), 50*time.Millisecond).Error()
			return rueidis.IsRedisNil(err)
		}, 20*time.Second, 50*time.Millisecond, "the half-open probe's nil reply closes the breaker")
		require.Equal(t, BreakerClosed, b.breaker.State(scope))
	})
}

// TestDoBlockingRefuses: commands DoBlocking cannot send safely are refused
// with an error and never reach Redis or the breaker.
func TestDoBlockingRefuses(t *testing.T) {
	t.Parallel()
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		b := blockingBackend(t, r, c)
		key := r.Keys.Key("q")
		tests := []struct {
			name    string
			given   rueidis.Completed
			timeout time.Duration
			want    string // "" when accepted
		}{
			{"GET", c.B().Get().Key(key).Build(), time.Second, "GET is not a blocking command"},
			{"BZPOPMIN timeout mismatch", c.B().Bzpopmin().Key(key).Timeout(2).Build(), time.Second, "does not match"},
			{"BZPOPMIN server timeout zero", c.B().Bzpopmin().Key(key).Timeout(0).Build(), 0, "below 1 ms"},
			{"BZPOPMIN timeout zero (forever)", c.B().Bzpopmin().Key(key).Timeout(0).Build(), time.Second, "not a positive number"},
			{"BLPOP unmarked", c.B().Arbitrary("BLPOP").Keys(key).Args("1").Build(), time.Second, "not marked blocking"},
			{"XREAD without BLOCK", c.B().Xread().Streams().Key(key).Id("0").Build(), time.Second, "without BLOCK"},
			{"XREAD BLOCK mismatch", c.B().Xread().Block(500).Streams().Key(key).Id("$").Build(), time.Second, "does not match"},
			{"BZPOPMIN", c.B().Bzpopmin().Key(key).Timeout(1.5).Build(), 1500 * time.Millisecond, ""},
			{"BZPOPMAX", c.B().Bzpopmax().Key(key).Timeout(0.25).Build(), 250 * time.Millisecond, ""},
			{"BLMOVE", c.B().Blmove().Source(key).Destination(key).Left().Right().Timeout(1).Build(), time.Second, ""},
			{"BZMPOP", c.B().Bzmpop().Timeout(1).Numkeys(1).Key(key).Min().Build(), time.Second, ""},
			{"BLMPOP", c.B().Blmpop().Timeout(1).Numkeys(1).Key(key).Left().Build(), time.Second, ""},
			{"XREAD BLOCK", c.B().Xread().Count(1).Block(1000).Streams().Key(key).Id("$").Build(), time.Second, ""},
			{"XREADGROUP BLOCK", c.B().Xreadgroup().Group("BLOCK", "c").Count(1).Block(200).Noack().Streams().Key(key).Id(">").Build(), 200 * time.Millisecond, ""},
			{"BLPOP arbitrary blocking", c.B().Arbitrary("BLPOP").Keys(key).Args("1").Blocking(), time.Second, ""},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				err := checkBlocking(tt.given, tt.timeout)
				if tt.want == "" {
					require.NoError(t, err)
					return
				}
				require.ErrorIs(t, err, errNotBlocking)
				require.ErrorContains(t, err, tt.want)
				require.ErrorIs(t, b.DoBlocking(context.Background(), key, tt.given, tt.timeout).Error(), errNotBlocking)
			})
		}
		require.Empty(t, b.breaker.Stats(), "a refused command reaches neither Redis nor the breaker")
	})
}
