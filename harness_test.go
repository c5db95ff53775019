package redisecho

// The real-Redis test harness.
//
// TestMain starts throwaway redis-server processes from PATH on free loopback
// ports (internal/redistest): one standalone server and a 3-master Redis
// Cluster. Tests run their body once per topology with forEachTopology,
// isolate themselves by a unique, brace-free key prefix (never
// FLUSHDB/FLUSHALL), and get a fresh rueidis client per simulated instance.
// Fault tests start dedicated servers with newFaultRedis and kill
// connections, pause (SIGSTOP) or stop and restart them.
//
// Environment:
//
//	REDISECHO_TEST_STANDALONE  host:port of an existing standalone server
//	REDISECHO_TEST_CLUSTER     comma-separated seeds of an existing cluster
//	REDISECHO_REDIS_SERVER     redis-server binary (default: from PATH)
//
// Without a redis-server binary and without those variables the run fails
// with a message saying how to install Redis. It never skips.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho/internal/redistest"
)

// topology is one Redis deployment the suite runs against.
type topology struct {
	name  string   // "standalone" or "cluster"
	addrs []string // seeds for rueidis.ClientOption.InitAddress
}

var (
	standaloneRedis *topology
	clusterRedis    *topology
)

func TestMain(m *testing.M) {
	if cfg := os.Getenv(jobChildEnv); cfg != "" {
		os.Exit(runJobChild(cfg)) // a worker process of TestJobsSurviveSIGKILL
	}
	os.Exit(redistest.Run(m, func(standalone, cluster *redistest.Topology) {
		standaloneRedis = &topology{name: standalone.Name, addrs: standalone.Addrs}
		clusterRedis = &topology{name: cluster.Name, addrs: cluster.Addrs}
	}))
}

// respDo sends one command over a fresh connection and reads one RESP2 reply
// (redistest.Do). The harness talks to servers this way, not through
// rueidis, so that its admin traffic neither depends on nor disturbs the
// client under test.
func respDo(addr string, timeout time.Duration, args ...string) (any, error) {
	return redistest.Do(addr, timeout, args...)
}

// testRedis is what a test body gets for one topology.
type testRedis struct {
	// Topology is "standalone" or "cluster".
	Topology string
	// Keys writes under a prefix unique to this test and topology. The prefix
	// holds no braces, so keys really spread over the cluster's slots.
	Keys Keyspace

	tb    testing.TB
	addrs []string
}

// forEachTopology runs body once on the standalone server and once on the
// cluster, as subtests named after the topology.
func forEachTopology(t *testing.T, body func(t *testing.T, r *testRedis)) {
	t.Helper()
	for _, tp := range []*topology{standaloneRedis, clusterRedis} {
		t.Run(tp.name, func(t *testing.T) {
			body(t, newTestRedis(t, tp.name, tp.addrs))
		})
	}
}

func newTestRedis(tb testing.TB, name string, addrs []string) *testRedis {
	tb.Helper()
	prefix := testPrefix(tb)
	ks, err := NewKeyspace(prefix)
	require.NoError(tb, err)
	r := &testRedis{Topology: name, Keys: ks, tb: tb, addrs: addrs}
	tb.Cleanup(r.deleteKeys)
	return r
}

// testPrefix returns a key prefix unique to the test: "t:<name>:<random>:",
// with every byte of the name outside [A-Za-z0-9_-] replaced by '_'.
func testPrefix(tb testing.TB) string {
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	name := []byte(tb.Name())
	for i, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			name[i] = '_'
		}
	}
	if len(name) > 60 {
		name = name[len(name)-60:]
	}
	return "t:" + string(name) + ":" + hex.EncodeToString(rnd[:]) + ":"
}

// Client returns a new rueidis client for this topology, closed when the test
// ends. Each simulated application instance must get its own. The default
// options keep client-side caching on, as in production.
func (r *testRedis) Client(opts ...func(*rueidis.ClientOption)) rueidis.Client {
	r.tb.Helper()
	opt := rueidis.ClientOption{InitAddress: r.addrs}
	for _, o := range opts {
		o(&opt)
	}
	c, err := rueidis.NewClient(opt)
	require.NoError(r.tb, err, "connect to %s redis at %v", r.Topology, r.addrs)
	r.tb.Cleanup(c.Close)
	return c
}

// deleteKeys removes every key under the test's prefix, scanning every
// master. It deletes key by key, so it never sends a cross-slot command.
func (r *testRedis) deleteKeys() {
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: r.addrs, DisableCache: true})
	if err != nil {
		return // a fault test may have stopped the server for good
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = scanMasters(ctx, c, matchPattern(r.Keys.Prefix()), func(ctx context.Context, _ rueidis.Client, keys []string) error {
		cmds := make(rueidis.Commands, 0, len(keys))
		for _, k := range keys {
			cmds = append(cmds, c.B().Unlink().Key(k).Build())
		}
		for _, res := range c.DoMulti(ctx, cmds...) {
			if err := res.Error(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		r.tb.Logf("cleanup of %s*: %v", r.Keys.Prefix(), err)
	}
}

// faultRedis is a dedicated deployment for one fault test: its own standalone
// server or its own 3-master cluster, so that killing, pausing or stopping it
// never disturbs tests running in parallel.
type faultRedis struct {
	*testRedis
	tp      *redistest.Topology
	servers []*redisServer
}

// redisServer is one process of a faultRedis.
type redisServer struct{ *redistest.Server }

func (s *redisServer) addr() string { return s.Addr() }

// newFaultRedis starts a dedicated deployment of the named topology
// ("standalone" or "cluster") and stops it when the test ends. It needs a
// redis-server binary even when the suite runs against external servers.
func newFaultRedis(t *testing.T, name string) *faultRedis {
	t.Helper()
	tp, err := redistest.Start(name)
	require.NoError(t, err, "fault tests start their own redis-server\n%s", redistest.InstallHint)
	t.Cleanup(tp.Close)
	f := &faultRedis{testRedis: newTestRedis(t, name, tp.Addrs), tp: tp}
	for _, s := range tp.Servers {
		f.servers = append(f.servers, &redisServer{s})
	}
	return f
}

// forEachFaultTopology runs body once per topology, each on a dedicated
// deployment.
func forEachFaultTopology(t *testing.T, body func(t *testing.T, f *faultRedis)) {
	t.Helper()
	for _, name := range []string{"standalone", "cluster"} {
		t.Run(name, func(t *testing.T) { body(t, newFaultRedis(t, name)) })
	}
}

// Servers returns the deployment's processes (one, or the three masters).
func (f *faultRedis) Servers() []*redisServer { return f.servers }

// KillConnections closes every client connection on every node (CLIENT KILL
// TYPE normal, and pubsub), as a network blip or a proxy restart would.
// Clients reconnect on their next command.
func (f *faultRedis) KillConnections(t *testing.T) {
	t.Helper()
	for _, s := range f.tp.Servers {
		for _, typ := range []string{"normal", "pubsub"} {
			_, err := respDo(s.Addr(), 2*time.Second, "CLIENT", "KILL", "TYPE", typ, "SKIPME", "yes")
			require.NoError(t, err, "CLIENT KILL on %s", s.Addr())
		}
	}
}

// Pause freezes the given servers (every server when none are given) with
// SIGSTOP: connections stay open and commands hang, as with a stalled host.
// Resume undoes it; a paused server is resumed when the test ends.
func (f *faultRedis) Pause(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		require.NoError(t, s.Pause(), "SIGSTOP %s", s.Addr())
		t.Cleanup(func() { _ = s.Resume() })
	}
}

// Resume continues servers frozen by Pause (every server when none are given).
func (f *faultRedis) Resume(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		require.NoError(t, s.Resume(), "SIGCONT %s", s.Addr())
	}
}

// Stop kills the given servers (every server when none are given): new
// connections are refused until Start.
func (f *faultRedis) Stop(t *testing.T, servers ...*redisServer) {
	t.Helper()
	f.tp.StopServers(f.pick(servers)...)
}

// Start restarts servers stopped by Stop on their old ports (every server when
// none are given). A restarted server is empty; a cluster node keeps its
// identity and slots from nodes.conf, and Start waits for cluster_state:ok.
func (f *faultRedis) Start(t *testing.T, servers ...*redisServer) {
	t.Helper()
	require.NoError(t, f.tp.StartServers(f.pick(servers)...))
}

// pick returns the processes of servers, or every one of the deployment
// when none are given.
func (f *faultRedis) pick(servers []*redisServer) []*redistest.Server {
	if len(servers) == 0 {
		return f.tp.Servers
	}
	out := make([]*redistest.Server, len(servers))
	for i, s := range servers {
		out[i] = s.Server
	}
	return out
}

// Fill makes the given servers (every server when none are given) answer as
// a full Redis does: maxmemory-policy noeviction and a maxmemory of 1 byte,
// below any used_memory, so that every deny-OOM command is refused with
// "OOM command not allowed". Free undoes it; it is undone when the test ends.
func (f *faultRedis) Fill(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		_, err := respDo(s.Addr(), 2*time.Second, "CONFIG", "SET", "maxmemory-policy", "noeviction")
		require.NoError(t, err)
		_, err = respDo(s.Addr(), 2*time.Second, "CONFIG", "SET", "maxmemory", "1")
		require.NoError(t, err)
		t.Cleanup(func() { _, _ = respDo(s.Addr(), 2*time.Second, "CONFIG", "SET", "maxmemory", "0") })
	}
}

// Free lifts the memory limit that Fill set (on every server when none are
// given).
func (f *faultRedis) Free(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		_, err := respDo(s.Addr(), 2*time.Second, "CONFIG", "SET", "maxmemory", "0")
		require.NoError(t, err)
	}
}

// freezeProxy is a TCP proxy in front of one server that a test can freeze:
// it then stops forwarding in both directions without closing anything, as
// a network partition that drops packets does (a real server cannot be made
// to do that: SIGSTOP still lets the kernel accept and acknowledge).
// Connections accepted while frozen reach the server only after Thaw.
type freezeProxy struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	thawed chan struct{} // closed while forwarding, open while frozen
	conns  []net.Conn
	closed bool
}

// newFreezeProxy starts a proxy to target on a free loopback port, closed
// (with every connection through it) when the test ends.
func newFreezeProxy(t *testing.T, target string) *freezeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &freezeProxy{ln: ln, target: target, thawed: make(chan struct{})}
	close(p.thawed)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

// Addr is the address clients dial instead of the target's.
func (p *freezeProxy) Addr() string { return p.ln.Addr().String() }

// Freeze stops forwarding: bytes already read are held, nothing more is
// delivered either way, and no connection is closed.
func (p *freezeProxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.thawed:
		p.thawed = make(chan struct{})
	default:
	}
}

// Thaw resumes forwarding, delivering what was held.
func (p *freezeProxy) Thaw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.thawed:
	default:
		close(p.thawed)
	}
}

// wait blocks while the proxy is frozen.
func (p *freezeProxy) wait() {
	p.mu.Lock()
	ch := p.thawed
	p.mu.Unlock()
	<-ch
}

func (p *freezeProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = c.Close()
		return false
	}
	p.conns = append(p.conns, c)
	return true
}

func (p *freezeProxy) serve() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(in) {
			return
		}
		go func() {
			p.wait() // a connection made during the partition goes nowhere yet
			out, err := net.Dial("tcp", p.target)
			if err != nil || !p.track(out) {
				_ = in.Close()
				return
			}
			go p.pump(out, in)
			p.pump(in, out)
		}()
	}
}

// pump forwards src to dst, holding each chunk while the proxy is frozen.
func (p *freezeProxy) pump(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.wait()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	_ = dst.Close()
	_ = src.Close()
}

func (p *freezeProxy) close() {
	p.mu.Lock()
	p.closed = true
	conns := p.conns
	p.mu.Unlock()
	p.Thaw()
	_ = p.ln.Close()
	for _, c := range conns {
		_ = c.Close()
	}
}

// nodeAddr returns the address of a node client from masters.
func nodeAddr(n rueidis.Client) string {
	if a, ok := n.(addressed); ok {
		return a.addr
	}
	return ""
}
