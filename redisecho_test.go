package redisecho

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
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
		// Bounded: no part takes more than MaxKeyPart bytes of a key.
		require.LessOrEqual(t, len(ks.Key(part1)), len("t:fuzz:")+MaxKeyPart)
	})
}

// TestKeyPartsAreBounded: a part of any length takes at most MaxKeyPart
// bytes of a key, keeps a readable head, and stays distinct from every
// other part, including one that spells out its digested form.
func TestKeyPartsAreBounded(t *testing.T) {
	long := strings.Repeat("a", 1<<20)
	tests := []struct {
		name     string
		given    string
		wantHead string
		digested bool
	}{
		{name: "short part kept", given: "/api/products/7", wantHead: "/api/products/7"},
		{name: "exactly MaxKeyPart kept", given: strings.Repeat("b", MaxKeyPart), wantHead: strings.Repeat("b", MaxKeyPart)},
		{name: "one byte more digested", given: strings.Repeat("b", MaxKeyPart+1), wantHead: strings.Repeat("b", KeptPartHead), digested: true},
		{name: "escaping counts", given: strings.Repeat(":", MaxKeyPart/3+1), wantHead: strings.Repeat("%3A", KeptPartHead/3), digested: true},
		{name: "1 MB path", given: "/api/products/" + long, wantHead: ("/api/products/" + long)[:KeptPartHead], digested: true},
		{name: "UTF-8 not cut", given: strings.Repeat("é", 200), wantHead: strings.Repeat("é", KeptPartHead/2), digested: true},
	}
	ks := Keyspace{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := ks.Group("c", tt.given).Key("e")
			tag := strings.TrimSuffix(strings.TrimPrefix(ks.Group("c", tt.given).Tag(), "{c:"), "}")
			require.LessOrEqual(t, len(tag), MaxKeyPart)
			require.True(t, strings.HasPrefix(tag, tt.wantHead), "tag %.80q", tag)
			if tt.digested {
				require.Equal(t, tt.wantHead+"%~"+Digest(tt.given), tag)
				require.LessOrEqual(t, len(tag), KeptPartHead+45)
			} else {
				require.Equal(t, escape(tt.given), tag)
			}
			require.Equal(t, keySlot(ks.Group("c", tt.given).Key()), keySlot(k))
		})
	}
	// A kept part can never equal a digested one: escaping never writes "%~".
	forged := strings.Repeat("b", KeptPartHead) + "%~" + Digest(strings.Repeat("b", MaxKeyPart+1))
	require.NotEqual(t, ks.Key(strings.Repeat("b", MaxKeyPart+1)), ks.Key(forged))
	require.NotEqual(t, ks.Key(long), ks.Key(long+"a"))
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
		require.Eventually(t, func() bool {
			for range 20 { // every pooled connection has reconnected
				if do(time.Second) != nil {
					return false
				}
			}
			return true
		}, 10*time.Second, 20*time.Millisecond, "the client reconnects after CLIENT KILL")

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

// getHealth serves one request to h and decodes the HealthReport.
func getHealth(t *testing.T, h echo.HandlerFunc) (int, HealthReport, time.Duration) {
	t.Helper()
	e := echo.New()
	e.GET("/health", h)
	rec := httptest.NewRecorder()
	start := time.Now()
	e.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health", nil))
	took := time.Since(start)
	var rep HealthReport
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &rep), rec.Body.String())
	require.Equal(t, "no-store", rec.Header().Get("Cache-Control"))
	return rec.Code, rep, took
}

func TestReadinessReportsModeAndNodes(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		c := r.Client()
		code, rep, _ := getHealth(t, Readiness(c))
		require.Equal(t, http.StatusOK, code)
		assert.Empty(t, rep.Redis.Nodes, "no topology without Detail")
		assert.Equal(t, "closed", rep.Redis.Breaker)
		code, rep, _ = getHealth(t, ReadinessWithConfig(ReadinessConfig{Client: c, Detail: true}))
		require.Equal(t, http.StatusOK, code)
		assert.Equal(t, "ok", rep.Status)
		assert.Equal(t, "up", rep.Redis.State)
		assert.Equal(t, r.Topology, rep.Redis.Mode)
		if r.Topology == "cluster" {
			assert.Len(t, rep.Redis.Nodes, 3)
		} else {
			assert.Len(t, rep.Redis.Nodes, 1)
		}
		for _, n := range rep.Redis.Nodes {
			assert.True(t, n.OK, n.Addr)
		}
	})
}

func TestReadinessIsUnavailableWhileBreakerIsOpen(t *testing.T) {
	c := standaloneClient(t)
	br := NewBreaker(BreakerConfig{Failures: 1, Logger: discardLogger()})
	br.record(br.node("redis"), unhealthy)
	code, rep, _ := getHealth(t, ReadinessWithConfig(ReadinessConfig{Client: c, Breaker: br, Detail: true}))
	require.Equal(t, http.StatusServiceUnavailable, code)
	assert.Equal(t, "breaker-open", rep.Redis.State)
	assert.Equal(t, "open", rep.Redis.Breaker)
	require.Len(t, rep.Redis.Scopes, 1)
	assert.Equal(t, "open", rep.Redis.Scopes[0].StateName)
}

func TestReadinessUnderFaults(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		c := f.Client()
		h := ReadinessWithConfig(ReadinessConfig{Client: c, Timeout: 300 * time.Millisecond, Detail: true})
		code, _, _ := getHealth(t, h)
		require.Equal(t, http.StatusOK, code)

		f.Pause(t)
		code, rep, took := getHealth(t, h)
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Less(t, took, 2*time.Second, "readiness answers within its deadline when Redis hangs")
		assert.Equal(t, "down", rep.Redis.State)
		for _, n := range rep.Redis.Nodes {
			if !n.OK {
				assert.Contains(t, []string{"timeout", "unreachable"}, n.Error, "never internal text")
			}
		}
		f.Resume(t)
		require.Eventually(t, func() bool { code, _, _ := getHealth(t, h); return code == http.StatusOK }, 10*time.Second, 50*time.Millisecond)

		f.Stop(t)
		code, _, took = getHealth(t, h)
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Less(t, took, 2*time.Second)
		f.Start(t)
		require.Eventually(t, func() bool { code, _, _ := getHealth(t, h); return code == http.StatusOK }, 20*time.Second, 50*time.Millisecond,
			"readiness recovers without a restart")
	})
}

// TestClientHolderStartsWhileRedisIsDown: an app whose Redis is down at start
// answers readiness 503 "connecting", then 200 once Redis is up, without a
// restart.
func TestClientHolderStartsWhileRedisIsDown(t *testing.T) {
	t.Parallel()
	forEachFaultTopology(t, func(t *testing.T, f *faultRedis) {
		f.Stop(t)
		holder := NewClientHolder(rueidis.ClientOption{InitAddress: f.addrs})
		require.Nil(t, holder.Client(), "no I/O before Start")
		holder.Start()
		t.Cleanup(holder.Close)
		h := ReadinessWithConfig(ReadinessConfig{Holder: holder, Timeout: 300 * time.Millisecond})

		code, rep, took := getHealth(t, h)
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Equal(t, "connecting", rep.Redis.State)
		require.Less(t, took, time.Second)
		require.Eventually(t, func() bool { return holder.Err() != nil }, 5*time.Second, 10*time.Millisecond)

		f.Start(t)
		select {
		case <-holder.Ready():
		case <-time.After(20 * time.Second):
			t.Fatal("the holder did not connect after Redis started")
		}
		require.Eventually(t, func() bool { code, _, _ := getHealth(t, h); return code == http.StatusOK }, 10*time.Second, 50*time.Millisecond)
		_, rep, _ = getHealth(t, h)
		require.Equal(t, f.Topology, rep.Redis.Mode)
	})
}

func TestClientHolderCloseWithoutStart(t *testing.T) {
	h := NewClientHolder(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:1"}})
	h.Close()
	h.Close()
	require.Nil(t, h.Client())
}

func TestReadinessConfigValidation(t *testing.T) {
	c := standaloneClient(t)
	tests := []struct {
		name    string
		given   ReadinessConfig
		wantErr error
	}{
		{name: "neither client nor holder", given: ReadinessConfig{}, wantErr: ErrNilClient},
		{name: "both", given: ReadinessConfig{Client: c, Holder: NewClientHolder(rueidis.ClientOption{})}, wantErr: ErrNilClient},
		{name: "negative timeout", given: ReadinessConfig{Client: c, Timeout: -1}, wantErr: ErrInvalidTimeout},
		{name: "ok", given: ReadinessConfig{Client: c}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.given.ToHandler()
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				require.Panics(t, func() { ReadinessWithConfig(tt.given) })
				return
			}
			require.NoError(t, err)
		})
	}
}

func TestLivenessNeedsNoRedis(t *testing.T) {
	e := echo.New()
	e.GET("/livez", Liveness())
	rec := httptest.NewRecorder()
	e.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/livez", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	require.JSONEq(t, `{"status":"ok"}`, rec.Body.String())
}

// TestSuiteFailsLoudlyWithoutRedis runs this test binary again with no
// redis-server in PATH and no server variables: it must fail with the
// install hint, never skip.
func TestSuiteFailsLoudlyWithoutRedis(t *testing.T) {
	if os.Getenv("REDISECHO_TEST_CHILD") == "1" {
		return
	}
	bin, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(bin, "-test.run=^TestSuiteFailsLoudlyWithoutRedis$", "-test.count=1")
	cmd.Env = []string{"PATH=" + t.TempDir(), "HOME=" + os.Getenv("HOME"), "REDISECHO_TEST_CHILD=1"}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit, "the run must fail: %s", out)
	require.NotZero(t, exit.ExitCode())
	require.Contains(t, string(out), "redis-server not found")
	require.Contains(t, string(out), "apt-get install -y redis-server")
	require.NotContains(t, string(out), "SKIP")
}

// TestDialErrorCode: the reasons a ClientHolder fails to connect, as fixed
// codes in the readiness report, never internal text. Each case is a real
// peer: a closed port, a server that is not Redis, a Redis with a password,
// and a listener that never answers.
func TestDialErrorCode(t *testing.T) {
	t.Parallel()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedAddr := closed.Addr().String()
	require.NoError(t, closed.Close())

	notRedis := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(notRedis.Close)

	silent, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = silent.Close() })
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c) // never read, never answered
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			_ = c.Close()
		}
	})

	f := newFaultRedis(t, "standalone")
	_, err = respDo(f.Servers()[0].addr(), 2*time.Second, "CONFIG", "SET", "requirepass", "s3cret")
	require.NoError(t, err)

	tests := []struct {
		name     string
		addr     string
		password string
		want     string
	}{
		{name: "nothing listens", addr: closedAddr, want: "refused"},
		{name: "an HTTP server", addr: strings.TrimPrefix(notRedis.URL, "http://"), want: "protocol"},
		{name: "wrong password", addr: f.Servers()[0].addr(), password: "wrong", want: "auth"},
		{name: "no password", addr: f.Servers()[0].addr(), want: "auth"},
		{name: "no answer", addr: silent.Addr().String(), want: "timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			holder := NewClientHolder(rueidis.ClientOption{
				InitAddress: []string{tt.addr}, Password: tt.password, ForceSingleClient: true,
				Dialer: net.Dialer{Timeout: 300 * time.Millisecond},
			})
			holder.Start()
			t.Cleanup(holder.Close)
			require.Eventually(t, func() bool { return holder.Err() != nil }, 10*time.Second, 10*time.Millisecond)
			require.Equal(t, tt.want, DialErrorCode(holder.Err()), "%v", holder.Err())
			code, rep, _ := getHealth(t, ReadinessWithConfig(ReadinessConfig{Holder: holder}))
			require.Equal(t, http.StatusServiceUnavailable, code)
			require.Equal(t, "connecting", rep.Redis.State)
			require.Equal(t, tt.want, rep.Redis.Error)
		})
	}
	require.Empty(t, DialErrorCode(nil))
}
