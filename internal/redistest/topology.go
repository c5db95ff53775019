package redistest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Topology is one Redis deployment that tests run against: a standalone
// server or a Redis Cluster, either started by this package or given by the
// environment (see FromEnv).
type Topology struct {
	// Name is "standalone" or "cluster".
	Name string
	// Addrs are the seeds for rueidis.ClientOption.InitAddress: the server,
	// or the cluster's masters.
	Addrs []string
	// Servers are the processes this package started (the server, or the
	// three masters); none for a deployment given by the environment.
	Servers []*Server
}

// FromEnv returns the deployment named name ("standalone" or "cluster")
// whose comma-separated addresses the environment variable env holds, after
// checking that each answers PING; or nil when env is unset or blank.
func FromEnv(name, env string) (*Topology, error) {
	v := strings.TrimSpace(os.Getenv(env))
	if v == "" {
		return nil, nil
	}
	tp := &Topology{Name: name}
	for _, a := range strings.Split(v, ",") {
		if a = strings.TrimSpace(a); a != "" {
			tp.Addrs = append(tp.Addrs, a)
		}
	}
	for _, a := range tp.Addrs {
		if _, err := Do(a, 2*time.Second, "PING"); err != nil {
			return nil, fmt.Errorf("%s=%s: %w", env, v, err)
		}
	}
	return tp, nil
}

// Start starts a deployment of the named topology: StartStandalone for
// "standalone", StartCluster for "cluster".
func Start(name string) (*Topology, error) {
	switch name {
	case "standalone":
		return StartStandalone()
	case "cluster":
		return StartCluster()
	}
	return nil, fmt.Errorf("unknown topology %q", name)
}

// StartStandalone starts one redis-server. Close stops it.
func StartStandalone() (*Topology, error) {
	s, err := NewServer(false)
	if err != nil {
		return nil, err
	}
	if err := s.Start(); err != nil {
		s.remove()
		return nil, err
	}
	return &Topology{Name: "standalone", Addrs: []string{s.Addr()}, Servers: []*Server{s}}, nil
}

// StartCluster starts three masters, splits the 16384 slots between them,
// introduces them to each other and waits for cluster_state:ok on every
// node. Close stops them.
func StartCluster() (*Topology, error) {
	tp := &Topology{Name: "cluster"}
	for range 3 {
		s, err := NewServer(true)
		if err == nil {
			tp.Servers = append(tp.Servers, s)
			err = s.Start()
		}
		if err != nil {
			tp.Close()
			return nil, err
		}
		tp.Addrs = append(tp.Addrs, s.Addr())
	}
	const slots = 16384
	for i, s := range tp.Servers {
		args := []string{"CLUSTER", "ADDSLOTS"}
		for slot := i * slots / 3; slot < (i+1)*slots/3; slot++ {
			args = append(args, strconv.Itoa(slot))
		}
		if _, err := Do(s.Addr(), 5*time.Second, args...); err != nil {
			tp.Close()
			return nil, fmt.Errorf("cluster addslots: %w", err)
		}
	}
	for _, s := range tp.Servers[1:] {
		if _, err := Do(tp.Servers[0].Addr(), 5*time.Second, "CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(s.port)); err != nil {
			tp.Close()
			return nil, fmt.Errorf("cluster meet: %w", err)
		}
	}
	if err := tp.WaitClusterOK(30 * time.Second); err != nil {
		tp.Close()
		return nil, err
	}
	return tp, nil
}

// WaitClusterOK waits until every started node of the cluster reports
// cluster_state:ok, knows every other node and maps every slot to one of
// them.
func (tp *Topology) WaitClusterOK(within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		ok := true
		var last string
		for _, s := range tp.Servers {
			reply, err := Do(s.Addr(), time.Second, "CLUSTER", "INFO")
			info, _ := reply.(string)
			if err != nil || !strings.Contains(info, "cluster_state:ok") ||
				!strings.Contains(info, fmt.Sprintf("cluster_known_nodes:%d", len(tp.Servers))) {
				ok, last = false, fmt.Sprintf("%s: %v %s", s.Addr(), err, info)
				break
			}
			// Every node must also map every slot to a master with a known
			// address, or a client's first topology read may find holes.
			if covered, err := tp.slotsCovered(s.Addr()); err != nil || !covered {
				ok, last = false, fmt.Sprintf("%s: CLUSTER SLOTS incomplete (%v)", s.Addr(), err)
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
func (tp *Topology) slotsCovered(addr string) (bool, error) {
	reply, err := Do(addr, time.Second, "CLUSTER", "SLOTS")
	if err != nil {
		return false, err
	}
	ranges, _ := reply.([]any)
	ports := map[string]bool{}
	for _, s := range tp.Servers {
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

// Close stops the servers this package started for the deployment and
// deletes their directories. It does nothing on nil or on a deployment
// given by the environment.
func (tp *Topology) Close() {
	if tp == nil {
		return
	}
	for _, s := range tp.Servers {
		s.remove()
	}
}

// pick returns servers, or every server of the deployment when none are
// given.
func (tp *Topology) pick(servers []*Server) []*Server {
	if len(servers) == 0 {
		return tp.Servers
	}
	return servers
}

// StopServers kills the given servers (every server when none are given):
// new connections are refused until StartServers.
func (tp *Topology) StopServers(servers ...*Server) {
	for _, s := range tp.pick(servers) {
		s.Stop()
	}
}

// StartServers restarts servers stopped by StopServers on their old ports
// (every server when none are given). A restarted server is empty; a cluster
// node keeps its identity and slots from nodes.conf, and StartServers waits
// for cluster_state:ok.
func (tp *Topology) StartServers(servers ...*Server) error {
	for _, s := range tp.pick(servers) {
		if err := s.Start(); err != nil {
			return err
		}
	}
	if tp.Name == "cluster" {
		return tp.WaitClusterOK(30 * time.Second)
	}
	return nil
}

// URL returns the deployment as a URL that rueidis.ParseURL accepts:
// redis://host:port, with one addr= parameter per further seed of a
// cluster.
func (tp *Topology) URL() string {
	u := "redis://" + tp.Addrs[0]
	for i, a := range tp.Addrs[1:] {
		sep := "&"
		if i == 0 {
			sep = "?"
		}
		u += sep + "addr=" + a
	}
	return u
}

// DeleteKeys unlinks every key that starts with prefix from every master of
// the deployment and returns how many it unlinked. It walks each master
// with SCAN and sends one UNLINK per key, so it never blocks a server with
// KEYS, never touches other keys as FLUSHDB would, and never sends a
// cross-slot command. prefix must hold no glob metacharacter (*?[]\).
func (tp *Topology) DeleteKeys(prefix string) (int, error) {
	if prefix == "" || strings.ContainsAny(prefix, `*?[]\`) {
		return 0, fmt.Errorf("redistest: DeleteKeys wants a plain, non-empty prefix, not %q", prefix)
	}
	masters, err := tp.masters()
	if err != nil {
		return 0, err
	}
	total := 0
	for _, addr := range masters {
		n, err := unlinkMatching(addr, prefix+"*")
		total += n
		if err != nil {
			return total, fmt.Errorf("%s: %w", addr, err)
		}
	}
	return total, nil
}

// masters returns the address of every master: the server of a standalone
// deployment, the masters that CLUSTER NODES lists as healthy for a cluster.
func (tp *Topology) masters() ([]string, error) {
	if tp.Name != "cluster" {
		return tp.Addrs[:1], nil
	}
	var err error
	for _, seed := range tp.Addrs {
		var reply any
		if reply, err = Do(seed, 2*time.Second, "CLUSTER", "NODES"); err != nil {
			continue
		}
		nodes, _ := reply.(string)
		var out []string
		for _, line := range strings.Split(nodes, "\n") {
			// <id> <ip:port@cport[,hostname]> <flags> <master> ...
			f := strings.Fields(line)
			if len(f) < 3 || !hasFlag(f[2], "master") || hasFlag(f[2], "fail") || hasFlag(f[2], "noaddr") {
				continue
			}
			addr, _, _ := strings.Cut(f[1], "@")
			out = append(out, addr)
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("CLUSTER NODES on %s lists no healthy master", seed)
		}
		return out, nil
	}
	return nil, fmt.Errorf("CLUSTER NODES: %w", err)
}

func hasFlag(flags, flag string) bool {
	for _, f := range strings.Split(flags, ",") {
		if f == flag {
			return true
		}
	}
	return false
}

// unlinkMatching SCANs one node for pattern and UNLINKs every key found,
// each page's UNLINKs in one pipeline. The keys SCAN lists are the node's
// own, so each UNLINK goes to the key's owner.
func unlinkMatching(addr, pattern string) (int, error) {
	c, err := dial(addr, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	deleted, cursor := 0, "0"
	for {
		if err := c.send("SCAN", cursor, "MATCH", pattern, "COUNT", "500"); err != nil {
			return deleted, err
		}
		reply, err := c.read()
		if err != nil {
			return deleted, err
		}
		page, _ := reply.([]any)
		if len(page) != 2 {
			return deleted, fmt.Errorf("unexpected SCAN reply %v", reply)
		}
		cursor, _ = page[0].(string)
		keys, _ := page[1].([]any)
		for _, k := range keys {
			c.queue("UNLINK", fmt.Sprint(k))
		}
		if err := c.send("PING"); err != nil {
			return deleted, err
		}
		for range keys {
			n, err := c.read()
			if err != nil {
				return deleted, err
			}
			if n, ok := n.(int64); ok {
				deleted += int(n)
			}
		}
		if _, err := c.read(); err != nil {
			return deleted, err
		}
		if cursor == "0" || cursor == "" {
			return deleted, nil
		}
	}
}
