// Package redistest starts the real Redis deployments that the module's
// test suites run against: throwaway redis-server processes on free loopback
// ports, as one standalone server and as a 3-master Redis Cluster. Run does
// it for a test binary's TestMain; Start gives a test a dedicated deployment
// that it may stop, start again or pause (SIGSTOP) to inject faults.
//
// Environment:
//
//	REDISECHO_TEST_STANDALONE  host:port of an existing standalone server
//	REDISECHO_TEST_CLUSTER     comma-separated seeds of an existing cluster
//	REDISECHO_REDIS_SERVER     redis-server binary (default: from PATH)
//
// Without a redis-server binary and without those variables Run fails the
// test binary with InstallHint. It never skips.
package redistest

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// InstallHint tells how to give the suites the Redis they need.
const InstallHint = `redisecho tests need a real Redis (6.2+, 7.0 in CI) and never skip.
Install it with:   sudo apt-get install -y redis-server   (or run: make test, which does it)
or point the suite at running servers:
  REDISECHO_TEST_STANDALONE=127.0.0.1:6379 REDISECHO_TEST_CLUSTER=127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`

// Run is a TestMain body: it sets up the standalone server and the cluster
// (from REDISECHO_TEST_STANDALONE and REDISECHO_TEST_CLUSTER when set, else
// by starting them), hands them to use, runs the tests and stops what it
// started. It returns the exit code: 1, with InstallHint on stderr, when it
// cannot set up Redis.
func Run(m *testing.M, use func(standalone, cluster *Topology)) int {
	var started []*Topology
	defer func() {
		for _, tp := range started {
			tp.Close()
		}
	}()
	standalone, err := FromEnv("standalone", "REDISECHO_TEST_STANDALONE")
	if err == nil && standalone == nil {
		standalone, err = StartStandalone()
		started = append(started, standalone)
	}
	var cluster *Topology
	if err == nil {
		if cluster, err = FromEnv("cluster", "REDISECHO_TEST_CLUSTER"); err == nil && cluster == nil {
			cluster, err = StartCluster()
			started = append(started, cluster)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: cannot set up Redis for the tests: %v\n\n%s\n", err, InstallHint)
		return 1
	}
	fmt.Fprintf(os.Stderr, "redis: standalone at %s, cluster at %s\n",
		strings.Join(standalone.Addrs, ","), strings.Join(cluster.Addrs, ","))
	use(standalone, cluster)
	return m.Run()
}
