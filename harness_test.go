package redisecho

// The real-Redis test harness.
//
// TestMain starts throwaway redis-server processes from PATH on free loopback
// ports: one standalone server and a 3-master Redis Cluster. Tests run their
// body once per topology with forEachTopology, isolate themselves by a unique,
// brace-free key prefix (never FLUSHDB/FLUSHALL), and get a fresh rueidis
// client per simulated instance. Fault tests start dedicated servers with
// newFaultRedis and kill connections, pause (SIGSTOP) or stop and restart them.
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
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"
)

const installHint = `redisecho tests need a real Redis (6.2+, 7.0 in CI) and never skip.
Install it with:   sudo apt-get install -y redis-server   (or run: make test, which does it)
or point the suite at running servers:
  REDISECHO_TEST_STANDALONE=127.0.0.1:6379 REDISECHO_TEST_CLUSTER=127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`

// topology is one Redis deployment the suite runs against.
type topology struct {
	name    string   // "standalone" or "cluster"
	addrs   []string // seeds for rueidis.ClientOption.InitAddress
	servers []*redisServer
}

var (
	standaloneRedis *topology
	clusterRedis    *topology
)

func TestMain(m *testing.M) {
	os.Exit(runWithRedis(m))
}

func runWithRedis(m *testing.M) int {
	var started []*topology
	defer func() {
		for _, tp := range started {
			tp.stop()
		}
	}()
	var err error
	if standaloneRedis, err = topologyFromEnv("standalone", "REDISECHO_TEST_STANDALONE"); err == nil && standaloneRedis == nil {
		standaloneRedis, err = startStandalone()
		started = append(started, standaloneRedis)
	}
	if err == nil {
		if clusterRedis, err = topologyFromEnv("cluster", "REDISECHO_TEST_CLUSTER"); err == nil && clusterRedis == nil {
			clusterRedis, err = startCluster()
			started = append(started, clusterRedis)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: cannot set up Redis for the tests: %v\n\n%s\n", err, installHint)
		return 1
	}
	fmt.Fprintf(os.Stderr, "redis: standalone at %s, cluster at %s\n",
		strings.Join(standaloneRedis.addrs, ","), strings.Join(clusterRedis.addrs, ","))
	return m.Run()
}

func topologyFromEnv(name, env string) (*topology, error) {
	v := strings.TrimSpace(os.Getenv(env))
	if v == "" {
		return nil, nil
	}
	tp := &topology{name: name}
	for _, a := range strings.Split(v, ",") {
		if a = strings.TrimSpace(a); a != "" {
			tp.addrs = append(tp.addrs, a)
		}
	}
	for _, a := range tp.addrs {
		if _, err := respDo(a, 2*time.Second, "PING"); err != nil {
			return nil, fmt.Errorf("%s=%s: %w", env, v, err)
		}
	}
	return tp, nil
}

func startStandalone() (*topology, error) {
	s, err := newRedisServer(false)
	if err == nil {
		err = s.start()
	}
	if err != nil {
		return nil, err
	}
	return &topology{name: "standalone", addrs: []string{s.addr()}, servers: []*redisServer{s}}, nil
}

// startCluster starts three masters, splits the 16384 slots between them,
// introduces them to each other and waits for cluster_state:ok on every node.
func startCluster() (*topology, error) {
	tp := &topology{name: "cluster"}
	for range 3 {
		s, err := newRedisServer(true)
		if err == nil {
			err = s.start()
		}
		if err != nil {
			tp.stop()
			return nil, err
		}
		tp.servers = append(tp.servers, s)
		tp.addrs = append(tp.addrs, s.addr())
	}
	const slots = 16384
	for i, s := range tp.servers {
		args := []string{"CLUSTER", "ADDSLOTS"}
		for slot := i * slots / 3; slot < (i+1)*slots/3; slot++ {
			args = append(args, strconv.Itoa(slot))
		}
		if _, err := respDo(s.addr(), 5*time.Second, args...); err != nil {
			tp.stop()
			return nil, fmt.Errorf("cluster addslots: %w", err)
		}
	}
	for _, s := range tp.servers[1:] {
		if _, err := respDo(tp.servers[0].addr(), 5*time.Second, "CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(s.port)); err != nil {
			tp.stop()
			return nil, fmt.Errorf("cluster meet: %w", err)
		}
	}
	if err := tp.waitClusterOK(30 * time.Second); err != nil {
		tp.stop()
		return nil, err
	}
	return tp, nil
}

// waitClusterOK waits until every node of the cluster reports
// cluster_state:ok and knows every other node.
func (tp *topology) waitClusterOK(within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		ok := true
		var last string
		for _, s := range tp.servers {
			reply, err := respDo(s.addr(), time.Second, "CLUSTER", "INFO")
			info, _ := reply.(string)
			if err != nil || !strings.Contains(info, "cluster_state:ok") ||
				!strings.Contains(info, fmt.Sprintf("cluster_known_nodes:%d", len(tp.servers))) {
				ok, last = false, fmt.Sprintf("%s: %v %s", s.addr(), err, info)
				break
			}
			// Every node must also map every slot to a master with a known
			// address, or a client's first topology read may find holes.
			if covered, err := tp.slotsCovered(s.addr()); err != nil || !covered {
				ok, last = false, fmt.Sprintf("%s: CLUSTER SLOTS incomplete (%v)", s.addr(), err)
				break
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster not ok after %s: %s", within, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// slotsCovered reports whether CLUSTER SLOTS on addr maps all 16384 slots
// to masters of this topology.
func (tp *topology) slotsCovered(addr string) (bool, error) {
	reply, err := respDo(addr, time.Second, "CLUSTER", "SLOTS")
	if err != nil {
		return false, err
	}
	ranges, _ := reply.([]any)
	ports := map[string]bool{}
	for _, s := range tp.servers {
		ports[strconv.Itoa(s.port)] = true
	}
	total := 0
	for _, r := range ranges {
		f, _ := r.([]any)
		if len(f) < 3 {
			return false, nil
		}
		lo, _ := f[0].(int64)
		hi, _ := f[1].(int64)
		node, _ := f[2].([]any)
		if len(node) < 2 {
			return false, nil
		}
		host, _ := node[0].(string)
		port, _ := node[1].(int64)
		if host == "" || !ports[strconv.FormatInt(port, 10)] {
			return false, nil
		}
		total += int(hi-lo) + 1
	}
	return total == 16384, nil
}

func (tp *topology) stop() {
	if tp == nil {
		return
	}
	for _, s := range tp.servers {
		s.stop()
		_ = os.RemoveAll(s.dir)
	}
}

// redisServer is one redis-server process started by the harness. It can be
// stopped and started again on the same port, with the same cluster identity.
type redisServer struct {
	port    int
	cluster bool
	dir     string

	mu  sync.Mutex
	cmd *exec.Cmd
}

var portMu sync.Mutex

// freePort returns a loopback port that is free, and whose cluster bus port
// (port+10000) is free too, so that cluster nodes can use the default bus port
// (which works on every Redis version, unlike cluster-port).
func freePort() (int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	for range 200 {
		n, err := rand.Int(rand.Reader, big.NewInt(20000))
		if err != nil {
			return 0, err
		}
		port := 20000 + int(n.Int64())
		if portFree(port) && portFree(port+10000) {
			return port, nil
		}
	}
	return 0, errors.New("no free loopback port pair found")
}

func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

func newRedisServer(cluster bool) (*redisServer, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "redisecho-test-*")
	if err != nil {
		return nil, err
	}
	return &redisServer{port: port, cluster: cluster, dir: dir}, nil
}

func redisServerBinary() (string, error) {
	if b := os.Getenv("REDISECHO_REDIS_SERVER"); b != "" {
		return b, nil
	}
	b, err := exec.LookPath("redis-server")
	if err != nil {
		return "", fmt.Errorf("redis-server not found in PATH: %w", err)
	}
	return b, nil
}

func (s *redisServer) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// start launches the process and waits until it answers PING.
func (s *redisServer) start() error {
	bin, err := redisServerBinary()
	if err != nil {
		return err
	}
	args := []string{
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", s.dir,
		"--logfile", filepath.Join(s.dir, "redis.log"),
	}
	if s.cluster {
		args = append(args,
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "2000",
			// A failed master must not take down the slots of healthy ones:
			// per-node degradation is part of what the suite tests.
			"--cluster-require-full-coverage", "no",
		)
	}
	cmd := exec.Command(bin, args...)
	setChildAttrs(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.mu.Lock()
	s.cmd = cmd
	s.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := respDo(s.addr(), 500*time.Millisecond, "PING"); err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("redis-server on port %d exited at start: %s", s.port, s.logTail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			return fmt.Errorf("redis-server on port %d did not answer PING: %s", s.port, s.logTail())
		}
	}
}

// stop kills the process by PID (resuming it first if it was paused) and
// waits until its port is free again.
func (s *redisServer) stop() {
	s.mu.Lock()
	cmd := s.cmd
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Kill()
	for range 200 {
		if portFree(s.port) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *redisServer) logTail() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "redis.log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}

// respDo sends one command over a fresh connection and reads one RESP2 reply.
// The harness talks to servers this way, not through rueidis, so that its
// admin traffic neither depends on nor disturbs the client under test.
func respDo(addr string, timeout time.Duration, args ...string) (any, error) {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(conn, b.String()); err != nil {
		return nil, err
	}
	return readRESP(bufio.NewReader(conn))
}

func readRESP(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("empty RESP line")
	}
	switch line[0] {
	case '+':
		return line[1:], nil
	case '-':
		return nil, errors.New(line[1:])
	case ':':
		return strconv.ParseInt(line[1:], 10, 64)
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = readRESP(r); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unexpected RESP line %q", line)
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
	tp *topology
}

// newFaultRedis starts a dedicated deployment of the named topology
// ("standalone" or "cluster") and stops it when the test ends. It needs a
// redis-server binary even when the suite runs against external servers.
func newFaultRedis(t *testing.T, name string) *faultRedis {
	t.Helper()
	var (
		tp  *topology
		err error
	)
	switch name {
	case "standalone":
		tp, err = startStandalone()
	case "cluster":
		tp, err = startCluster()
	default:
		t.Fatalf("unknown topology %q", name)
	}
	require.NoError(t, err, "fault tests start their own redis-server\n%s", installHint)
	t.Cleanup(tp.stop)
	return &faultRedis{testRedis: newTestRedis(t, name, tp.addrs), tp: tp}
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
func (f *faultRedis) Servers() []*redisServer { return f.tp.servers }

// KillConnections closes every client connection on every node (CLIENT KILL
// TYPE normal, and pubsub), as a network blip or a proxy restart would.
// Clients reconnect on their next command.
func (f *faultRedis) KillConnections(t *testing.T) {
	t.Helper()
	for _, s := range f.tp.servers {
		for _, typ := range []string{"normal", "pubsub"} {
			_, err := respDo(s.addr(), 2*time.Second, "CLIENT", "KILL", "TYPE", typ, "SKIPME", "yes")
			require.NoError(t, err, "CLIENT KILL on %s", s.addr())
		}
	}
}

// Pause freezes the given servers (every server when none are given) with
// SIGSTOP: connections stay open and commands hang, as with a stalled host.
// Resume undoes it; a paused server is resumed when the test ends.
func (f *faultRedis) Pause(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		require.NoError(t, signalServer(s, sigStop), "SIGSTOP %s", s.addr())
		t.Cleanup(func() { _ = signalServer(s, sigCont) })
	}
}

// Resume continues servers frozen by Pause (every server when none are given).
func (f *faultRedis) Resume(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		require.NoError(t, signalServer(s, sigCont), "SIGCONT %s", s.addr())
	}
}

// Stop kills the given servers (every server when none are given): new
// connections are refused until Start.
func (f *faultRedis) Stop(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		s.stop()
	}
}

// Start restarts servers stopped by Stop on their old ports (every server when
// none are given). A restarted server is empty; a cluster node keeps its
// identity and slots from nodes.conf, and Start waits for cluster_state:ok.
func (f *faultRedis) Start(t *testing.T, servers ...*redisServer) {
	t.Helper()
	for _, s := range f.pick(servers) {
		require.NoError(t, s.start())
	}
	if f.Topology == "cluster" {
		require.NoError(t, f.tp.waitClusterOK(30*time.Second))
	}
}

func (f *faultRedis) pick(servers []*redisServer) []*redisServer {
	if len(servers) == 0 {
		return f.tp.servers
	}
	return servers
}

func signalServer(s *redisServer, sig os.Signal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return fmt.Errorf("server on port %d is not running", s.port)
	}
	return s.cmd.Process.Signal(sig)
}
