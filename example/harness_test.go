package main

// The example's real-Redis test harness.
//
// TestMain sets up, through internal/redistest as the library's suite does,
// one standalone redis-server and one 3-master Redis Cluster, on free
// loopback ports (or the servers that REDISECHO_TEST_STANDALONE and
// REDISECHO_TEST_CLUSTER name; REDISECHO_REDIS_SERVER picks the binary).
// Without Redis the run fails with a message saying how to install it; it
// never skips. The embedded miniredis serves only the test of that default.
//
// The app runs with REDIS_URL pointing at a deployment, and writes under
// its fixed prefix (redisecho.DefaultPrefix). The tests share each
// deployment and run one after another, so forEachTopology empties that
// prefix (SCAN and UNLINK on every master; never FLUSHDB) before and after
// each run of a body: each starts from an empty keyspace, whatever a test or
// an earlier run left. Rate-limit tests also take their clients' addresses
// from clientIPs, so that their counts are their own.

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho"
	"github.com/redisecho/redisecho/internal/redistest"
)

var standaloneRedis, clusterRedis *redistest.Topology

func TestMain(m *testing.M) {
	os.Exit(redistest.Run(m, func(standalone, cluster *redistest.Topology) {
		standaloneRedis, clusterRedis = standalone, cluster
	}))
}

// forEachTopology runs body once on the standalone server and once on the
// cluster, as subtests named after the topology, with the deployment's
// REDIS_URL. Each run starts and ends with no key under the example's
// prefix on that deployment.
func forEachTopology(t *testing.T, body func(t *testing.T, redisURL string)) {
	t.Helper()
	for _, tp := range []*redistest.Topology{standaloneRedis, clusterRedis} {
		t.Run(tp.Name, func(t *testing.T) {
			clearExampleKeys(t, tp)
			t.Cleanup(func() { clearExampleKeys(t, tp) }) // after the app has stopped
			body(t, tp.URL())
		})
	}
}

// clearExampleKeys deletes every key the example wrote on tp.
func clearExampleKeys(t *testing.T, tp *redistest.Topology) {
	t.Helper()
	_, err := tp.DeleteKeys(redisecho.DefaultPrefix)
	require.NoError(t, err, "clear %s* on the %s deployment", redisecho.DefaultPrefix, tp.Name)
}

// forEachFaultTopology runs body once per topology, each on a dedicated
// deployment that it may stop and start again, and that is gone when the
// test ends. It needs a redis-server binary even when the suite runs
// against external servers.
func forEachFaultTopology(t *testing.T, body func(t *testing.T, tp *redistest.Topology)) {
	t.Helper()
	for _, name := range []string{"standalone", "cluster"} {
		t.Run(name, func(t *testing.T) {
			tp, err := redistest.Start(name)
			require.NoError(t, err, "fault tests start their own redis-server\n%s", redistest.InstallHint)
			t.Cleanup(tp.Close)
			body(t, tp)
		})
	}
}

// clientIPs hands out client addresses for X-Forwarded-For: consecutive
// ones from a random point of 198.18.0.0/15 (set aside for tests by RFC
// 2544), so that rate-limit counts are this run's alone, on a server an
// earlier run or another test used too.
type clientIPs struct{ next uint32 }

func newClientIPs() *clientIPs {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return &clientIPs{next: binary.BigEndian.Uint32(b[:])}
}

// ip returns the next address.
func (p *clientIPs) ip() string {
	n := p.next & (1<<17 - 1)
	p.next++
	return fmt.Sprintf("198.%d.%d.%d", 18+n>>16, n>>8&0xff, n&0xff)
}
