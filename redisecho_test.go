package redisecho

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hostileParts is user input that tries to move keys between slots or to make
// two keys collide.
var hostileParts = []string{
	"", "{", "}", "{}", "}{", "{a}", "a}b{c", "{{x}}", ":", "a:b", "%", "%7B",
	"%25", "/users/{id}", "user:{42}:profile", "ключ", "\x00\xff", "*", "?[]\\",
	strings.Repeat("{", 100),
}

func TestKeyspaceKeys(t *testing.T) {
	custom, err := NewKeyspace("app:")
	require.NoError(t, err)

	tests := []struct {
		name  string
		given string
		want  string
	}{
		{name: "default prefix", given: Keyspace{}.Key("limit", "1.2.3.4"), want: "redisecho:limit:1.2.3.4"},
		{name: "custom prefix", given: custom.Key("cache", "GET /"), want: "app:cache:GET /"},
		{name: "group shares a tag", given: Keyspace{}.Group("queue", "emails").Key("pending"), want: "redisecho:{queue:emails}:pending"},
		{name: "group with several parts", given: Keyspace{}.Group("q").Key("a", "b"), want: "redisecho:{q}:a:b"},
		{name: "braces in a tag are escaped", given: Keyspace{}.Group("queue", "{x}").Key("active"), want: "redisecho:{queue:%7Bx%7D}:active"},
		{name: "braces in a key part are escaped", given: Keyspace{}.Key("cache", "/a/{b}"), want: "redisecho:cache:/a/%7Bb%7D"},
		{name: "colons and percents are escaped", given: Keyspace{}.Key("a:b", "50%"), want: "redisecho:a%3Ab:50%25"},
		{name: "empty tag never hashes the whole key", given: Keyspace{}.Group().Key("x"), want: "redisecho:{%}:x"},
		{name: "empty tag part", given: Keyspace{}.Group("").Key("x"), want: "redisecho:{%}:x"},
		{name: "tag of a group", given: custom.Group("sess", "ab").Tag(), want: "{sess:ab}"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tt.given)
		})
	}
}

func TestNewKeyspace(t *testing.T) {
	tests := []struct {
		name    string
		given   string
		want    string
		wantErr error
	}{
		{name: "empty means default", given: "", want: DefaultPrefix},
		{name: "custom", given: "myapp:", want: "myapp:"},
		{name: "open brace", given: "my{app}:", wantErr: ErrInvalidPrefix},
		{name: "close brace", given: "app}", wantErr: ErrInvalidPrefix},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks, err := NewKeyspace(tt.given)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, ks.Prefix())
		})
	}
}

func TestDigest(t *testing.T) {
	d := Digest("secret token")
	assert.Len(t, d, 43)
	assert.NotContains(t, d, "secret")
	assert.Equal(t, d, Digest("secret token"))
	assert.NotEqual(t, d, Digest("secret token!"))
	assert.NotContains(t, Keyspace{}.Key(d), "%", "a digest needs no escaping")
}

func TestKeySlotKnownValues(t *testing.T) {
	// Values from the Redis Cluster specification and CLUSTER KEYSLOT.
	tests := []struct {
		given string
		want  uint16
	}{
		{given: "123456789", want: 12739},
		{given: "foo", want: 12182},
		{given: "{foo}.following", want: 12182},
		{given: "x{foo}{bar}", want: 12182},
	}
	for _, tt := range tests {
		t.Run(tt.given, func(t *testing.T) {
			assert.Equal(t, tt.want, keySlot(tt.given))
		})
	}
}

// TestKeySlotMatchesRedis checks keySlot against the cluster's own CLUSTER
// KEYSLOT for keys built from hostile input, so the fuzz test below proves
// what Redis does, not what this package believes.
func TestKeySlotMatchesRedis(t *testing.T) {
	r := newTestRedis(t, clusterRedis.name, clusterRedis.addrs)
	c := r.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The specification's examples of tag rules, then keys from hostile input.
	keys := []string{"{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}", "{}", "}{"}
	for _, p := range hostileParts {
		keys = append(keys, r.Keys.Key(p), r.Keys.Group(p).Key(p, "x"), "raw"+p)
	}
	for _, k := range keys {
		slot, err := c.Do(ctx, c.B().ClusterKeyslot().Key(k).Build()).AsInt64()
		require.NoError(t, err)
		assert.Equal(t, uint16(slot), keySlot(k), "key %q", k)
	}
}

// FuzzGroupKeysShareSlot proves that user input can never move a key out of
// its group's slot, that grouped keys keep the namespace prefix, and that
// different inputs never build the same key. `go test` runs the seed corpus;
// `go test -fuzz=FuzzGroupKeysShareSlot` explores further.
func FuzzGroupKeysShareSlot(f *testing.F) {
	for i, a := range hostileParts {
		b := hostileParts[(i+1)%len(hostileParts)]
		f.Add(a, b, b+a)
	}
	f.Fuzz(func(t *testing.T, tag, part1, part2 string) {
		ks, err := NewKeyspace("t:fuzz:")
		require.NoError(t, err)
		g := ks.Group("queue", tag)
		want := keySlot(g.Key())
		for _, k := range []string{g.Key("pending"), g.Key(part1), g.Key(part1, part2), g.Key(part2, "x")} {
			require.True(t, strings.HasPrefix(k, "t:fuzz:{"), k)
			require.Equal(t, want, keySlot(k), "key %q left the slot of %q", k, g.Tag())
		}
		// The tag is exactly the escaped input: no input closes it early.
		require.Equal(t, "{queue:"+escape(tag)+"}", g.Tag())
		// Ungrouped keys never carry a hash tag of user input.
		require.NotContains(t, ks.Key(part1, part2), "{")
		// Injective: different part lists, different keys.
		if part1 != part2 {
			require.NotEqual(t, ks.Key(part1), ks.Key(part2))
			require.NotEqual(t, ks.Group(part1).Key("k"), ks.Group(part2).Key("k"))
		}
		require.NotEqual(t, ks.Key(part1, part2), ks.Key(part1+":"+part2))
	})
}

func escape(s string) string {
	var b strings.Builder
	escapePart(&b, s)
	return b.String()
}

// TestGroupKeysWorkTogetherOnCluster runs multi-key commands and a script
// over one group with hostile user input, on both topologies.
func TestGroupKeysWorkTogetherOnCluster(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, p := range hostileParts {
			g := r.Keys.Group("queue", p)
			a, b := g.Key("pending", p), g.Key("active", "}"+p)
			require.NoError(t, c.Do(ctx, c.B().Mset().KeyValue().KeyValue(a, "1").KeyValue(b, "2").Build()).Error())
			got, err := c.Do(ctx, c.B().Mget().Key(a, b).Build()).AsStrSlice()
			require.NoError(t, err)
			require.Equal(t, []string{"1", "2"}, got)
		}
	})
}

// TestHarnessCatchesCrossSlot shows why every test runs on the cluster too: a
// multi-key command over keys of different slots works on a standalone
// server, and panics in rueidis's command builder on a cluster.
func TestHarnessCatchesCrossSlot(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		a, b := r.Keys.Key("a"), r.Keys.Key("b")
		require.NotEqual(t, keySlot(a), keySlot(b), "the test prefix must not pin keys to one slot")
		mget := func() { c.B().Mget().Key(a, b).Build() }
		if r.Topology == "cluster" {
			require.PanicsWithValue(t, "multi key command with different key slots are not allowed", mget)
			return
		}
		require.NotPanics(t, mget)
	})
}

func TestTestPrefixesSpreadOverSlots(t *testing.T) {
	r := newTestRedis(t, clusterRedis.name, clusterRedis.addrs)
	require.NotContains(t, r.Keys.Prefix(), "{")
	require.NotContains(t, r.Keys.Prefix(), "}")
	slots := map[uint16]bool{}
	for i := range 100 {
		slots[keySlot(r.Keys.Key(fmt.Sprint(i)))] = true
	}
	require.Greater(t, len(slots), 90)
}

func TestScanMastersSeesEveryKeyOnce(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var want []string
		for i := range 300 {
			k := r.Keys.Key("scan", fmt.Sprint(i))
			want = append(want, k)
			require.NoError(t, c.Do(ctx, c.B().Set().Key(k).Value("v").Build()).Error())
		}
		nodes, err := masters(ctx, c)
		require.NoError(t, err)
		if r.Topology == "cluster" {
			require.Len(t, nodes, 3)
		} else {
			require.Len(t, nodes, 1)
		}
		var got []string
		err = scanMasters(ctx, c, matchPattern(r.Keys.Prefix()+"scan:"), func(_ context.Context, _ rueidis.Client, keys []string) error {
			got = append(got, keys...)
			return nil
		})
		require.NoError(t, err)
		sort.Strings(want)
		sort.Strings(got)
		require.Equal(t, want, got)
	})
}

func TestMatchPatternEscapesGlobs(t *testing.T) {
	assert.Equal(t, `a\*b\?\[c\]\\*`, matchPattern(`a*b?[c]\`))
}

// TestFaultHelpers checks that the harness's faults are real: killed
// connections reconnect, a paused server makes calls hit their deadline, and
// a stopped server refuses until it is started again.
func TestFaultHelpers(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		c := f.Client()
		key := f.Keys.Key("fault")
		do := func(d time.Duration) error {
			ctx, cancel := context.WithTimeout(context.Background(), d)
			defer cancel()
			return c.Do(ctx, c.B().Set().Key(key).Value("v").Build()).Error()
		}
		require.NoError(t, do(time.Second))

		f.KillConnections(t)
		require.Eventually(t, func() bool { return do(time.Second) == nil }, 10*time.Second, 20*time.Millisecond,
			"the client reconnects after CLIENT KILL")

		f.Pause(t)
		start := time.Now()
		require.ErrorIs(t, do(200*time.Millisecond), context.DeadlineExceeded)
		require.Less(t, time.Since(start), 2*time.Second, "a paused server hangs calls until their deadline, no longer")
		f.Resume(t)
		require.Eventually(t, func() bool { return do(time.Second) == nil }, 10*time.Second, 20*time.Millisecond)

		f.Stop(t)
		require.Error(t, do(300*time.Millisecond))
		f.Start(t)
		require.Eventually(t, func() bool { return do(time.Second) == nil }, 20*time.Second, 50*time.Millisecond,
			"the client recovers after the server restarts")
	})
}
