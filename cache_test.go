package redisecho

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newCacheStore(t *testing.T, r *testRedis, client rueidis.Client, mod func(*CacheStoreConfig)) *CacheStore {
	t.Helper()
	cfg := CacheStoreConfig{Client: client, Options: Options{Prefix: r.Keys.Prefix(), Logger: discardLogger()}}
	if mod != nil {
		mod(&cfg)
	}
	cs, err := NewCacheStore(cfg)
	require.NoError(t, err)
	return cs
}

func ctx5s(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestCacheEntryRoundTrip(t *testing.T) {
	e := &entry{stored: 1, fresh: 2, stale: 3, status: 200, tags: []tagGen{{"products", 4}, {"p:{7}", 0}},
		header: http.Header{"Content-Type": {"application/json"}, "X-A": {"1", "2"}}, body: []byte(`{"ok":true}`)}
	got, err := decodeEntry(string(e.encode()))
	require.NoError(t, err)
	assert.Equal(t, e.stored, got.stored)
	assert.Equal(t, e.fresh, got.fresh)
	assert.Equal(t, e.stale, got.stale)
	assert.Equal(t, e.status, got.status)
	assert.Equal(t, e.tags, got.tags)
	assert.Equal(t, e.header, got.header)
	assert.Equal(t, e.body, got.body)
}

// FuzzDecodeEntryNeverPanics: a corrupt stored entry is a miss, never a
// panic.
func FuzzDecodeEntryNeverPanics(f *testing.F) {
	good := (&entry{stored: 1, fresh: 2, stale: 3, status: 200, tags: []tagGen{{"t", 1}}, header: http.Header{"A": {"b"}}, body: []byte("x")}).encode()
	f.Add(good)
	f.Add([]byte("RE1"))
	f.Add([]byte("garbage"))
	f.Add(good[:len(good)/2])
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := decodeEntry(string(data))
		if err == nil {
			require.NotNil(t, e)
			require.GreaterOrEqual(t, e.stale, e.fresh)
		}
	})
}

func TestCacheServiceGetSetDelete(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		var v map[string]int
		ok, err := cs.Get(ctx, "user:1", &v)
		require.NoError(t, err)
		require.False(t, ok)

		require.NoError(t, cs.Set(ctx, "user:1", map[string]int{"id": 1}, time.Minute))
		ok, err = cs.Get(ctx, "user:1", &v)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, map[string]int{"id": 1}, v)

		require.NoError(t, cs.Set(ctx, "user:1", map[string]int{"id": 2}, time.Minute))
		ok, _ = cs.Get(ctx, "user:1", &v)
		require.True(t, ok)
		require.Equal(t, 2, v["id"], "read-your-own-write through the local cache")

		require.NoError(t, cs.Delete(ctx, "user:1"))
		ok, err = cs.Get(ctx, "user:1", &v)
		require.NoError(t, err)
		require.False(t, ok, "read-your-own-delete")

		require.Error(t, cs.Set(ctx, "bad", func() {}, time.Minute), "a value that cannot be encoded")
		require.ErrorIs(t, cs.Set(ctx, "", 1, time.Minute), ErrInvalidCacheKey)
		require.ErrorIs(t, cs.Set(ctx, "k", 1, time.Minute, ""), ErrInvalidCacheKey)
		require.NoError(t, cs.Set(ctx, "{hostile}:key%", "v", time.Minute, "{tag}"))
		var s string
		ok, err = cs.Get(ctx, "{hostile}:key%", &s)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, "v", s)
	})
}

func TestCacheExpiry(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		clock := newFakeClock()
		cs := newCacheStore(t, r, r.Client(), func(c *CacheStoreConfig) { c.Clock = clock })
		ctx := ctx5s(t)
		require.NoError(t, cs.Set(ctx, "k", 1, time.Minute))
		var n int
		ok, _ := cs.Get(ctx, "k", &n)
		require.True(t, ok)
		clock.Advance(61 * time.Second)
		ok, _ = cs.Get(ctx, "k", &n)
		require.False(t, ok, "expired")
	})
}

func TestCacheCorruptEntryIsReplaced(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cs := newCacheStore(t, r, c, nil)
		ctx := ctx5s(t)
		for _, garbage := range []string{"not an entry", "RE1\x00", string((&entry{fresh: 1 << 62, stale: 1 << 62, body: []byte("{bad json")}).encode())} {
			require.NoError(t, c.Do(ctx, c.B().Set().Key(cs.entryKey("k")).Value(garbage).Build()).Error())
			cs.markDelete(cs.entryKey("k"))
			calls := 0
			v, err := Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) { calls++; return 42, nil })
			require.NoError(t, err)
			require.Equal(t, 42, v)
			require.Equal(t, 1, calls)
			v, err = Remember(ctx, cs, "k", time.Minute, func(context.Context) (int, error) { calls++; return 0, nil })
			require.NoError(t, err)
			require.Equal(t, 42, v, "replaced, then served")
			require.Equal(t, 1, calls)
		}
	})
}

func TestRemember(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		var calls atomic.Int32
		get := func() (string, error) {
			return Remember(ctx, cs, "greeting", time.Minute, func(context.Context) (string, error) {
				calls.Add(1)
				return "hello", nil
			})
		}
		for range 5 {
			v, err := get()
			require.NoError(t, err)
			require.Equal(t, "hello", v)
		}
		require.Equal(t, int32(1), calls.Load())

		// Errors are returned and not cached.
		boom := errors.New("boom")
		_, err := Remember(ctx, cs, "failing", time.Minute, func(context.Context) (int, error) { return 0, boom })
		require.ErrorIs(t, err, boom)
		v, err := Remember(ctx, cs, "failing", time.Minute, func(context.Context) (int, error) { return 7, nil })
		require.NoError(t, err)
		require.Equal(t, 7, v)

		// Not found is cached only when asked.
		var lookups atomic.Int32
		missing := func() (int, error) {
			return Remember(ctx, cs, "user:999", time.Minute, func(context.Context) (int, error) {
				lookups.Add(1)
				return 0, ErrCacheNotFound
			}, CacheNotFound(time.Minute))
		}
		for range 3 {
			_, err := missing()
			require.ErrorIs(t, err, ErrCacheNotFound)
		}
		require.Equal(t, int32(1), lookups.Load())
	})
}

func TestCacheTags(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		cs := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		version := 0
		get := func(key string, tags ...string) int {
			v, err := Remember(ctx, cs, key, time.Minute, func(context.Context) (int, error) { return version, nil }, WithTags(tags...))
			require.NoError(t, err)
			return v
		}
		require.Equal(t, 0, get("products", "products"))
		require.Equal(t, 0, get("product:7", "products", "product:7"))
		require.Equal(t, 0, get("product:8", "products", "product:8"))
		require.Equal(t, 0, get("users", "users"))
		version = 1
		require.NoError(t, cs.InvalidateTags(ctx, "product:7"))
		require.Equal(t, 1, get("product:7", "products", "product:7"), "invalidated")
		require.Equal(t, 0, get("product:8", "products", "product:8"), "other tags untouched")
		require.NoError(t, cs.InvalidateTags(ctx, "products"))
		require.Equal(t, 1, get("products", "products"))
		require.Equal(t, 1, get("product:8", "products", "product:8"))
		require.Equal(t, 0, get("users", "users"))
		require.ErrorIs(t, cs.InvalidateTags(ctx, ""), ErrInvalidCacheKey)
	})
}

// TestCacheTagRace: a fill that started before an invalidation and finished
// after it must not survive it.
func TestCacheTagRace(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheStore(t, r, r.Client(), nil)
		b := newCacheStore(t, r, r.Client(), nil) // another instance
		ctx := ctx5s(t)
		for i := range 20 {
			key := fmt.Sprint("race", i)
			started, release := make(chan struct{}), make(chan struct{})
			done := make(chan error, 1)
			go func() {
				_, err := Remember(ctx, a, key, time.Minute, func(context.Context) (string, error) {
					close(started)
					<-release
					return "old", nil
				}, WithTags("race"))
				done <- err
			}()
			<-started
			inv := a
			if i%2 == 1 {
				inv = b
			}
			require.NoError(t, inv.InvalidateTags(ctx, "race"))
			close(release)
			require.NoError(t, <-done)
			for _, st := range []*CacheStore{a, b} {
				require.Eventually(t, func() bool {
					v, err := Remember(ctx, st, key, time.Minute, func(context.Context) (string, error) { return "new", nil }, WithTags("race"))
					return err == nil && v == "new"
				}, 5*time.Second, 5*time.Millisecond, "the fill that raced the invalidation was served")
			}
		}
	})
}

// TestCacheReadYourOwnInvalidation: the instance that invalidates never
// serves the old entry again; another instance stops when the
// invalidation reaches it.
func TestCacheReadYourOwnInvalidation(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		a := newCacheStore(t, r, r.Client(), nil)
		b := newCacheStore(t, r, r.Client(), nil)
		ctx := ctx5s(t)
		for i := range 300 {
			want := fmt.Sprint("v", i)
			get := func(st *CacheStore) string {
				v, err := Remember(ctx, st, "hot", time.Minute, func(context.Context) (string, error) { return want, nil }, WithTags("hot"))
				require.NoError(t, err)
				return v
			}
			// Both instances hold the entry in their local caches.
			get(a)
			get(b)
			get(a)
			get(b)
			next := fmt.Sprint("v", i+1)
			switch i % 3 {
			case 0:
				require.NoError(t, a.InvalidateTags(ctx, "hot"))
			case 1:
				require.NoError(t, a.Delete(ctx, "hot"))
			case 2:
				require.NoError(t, a.Set(ctx, "hot", next, time.Minute, "hot"))
			}
			want = next
			require.Equal(t, want, get(a), "round %d: the invalidating instance served the old value", i)
			require.Eventually(t, func() bool { return get(b) == want }, 2*time.Second, time.Millisecond)
		}
	})
}

func TestCacheFlush(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		cs := newCacheStore(t, r, c, nil)
		ctx := ctx5s(t)
		for i := range 50 {
			require.NoError(t, cs.Set(ctx, fmt.Sprint("user:", i), i, time.Minute))
			require.NoError(t, cs.Set(ctx, fmt.Sprint("product:", i), i, time.Minute))
		}
		n, err := cs.Flush(ctx, "user:*")
		require.NoError(t, err)
		require.Equal(t, 50, n)
		var v int
		for i := range 50 {
			ok, err := cs.Get(ctx, fmt.Sprint("user:", i), &v)
			require.NoError(t, err)
			require.False(t, ok, "flushed, and this instance knows at once")
			ok, _ = cs.Get(ctx, fmt.Sprint("product:", i), &v)
			require.True(t, ok, "not matched by the pattern")
		}
		n, err = cs.Flush(ctx, "*")
		require.NoError(t, err)
		require.Equal(t, 50, n)
	})
}
