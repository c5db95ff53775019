// Package redisecho puts Redis behind Echo v4 web applications: server-side
// sessions, response caching and a cache service, rate limiting, realtime
// fan-out over Server-Sent Events and a reliable job queue, all on
// github.com/redis/rueidis with client-side caching.
//
// Every feature follows Echo's middleware grid (XConfig, X(...),
// XWithConfig(cfg), (XConfig).ToMiddleware()) and shares the plumbing in this
// file and in options.go: cluster-safe key naming, SCAN over every master,
// the circuit breaker, per-call deadlines, the clock and the logger.
package redisecho

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
)

// DefaultPrefix is the namespace every key written by the library starts
// with, unless a feature's Prefix option says otherwise.
const DefaultPrefix = "redisecho:"

// ErrInvalidPrefix is returned when a key prefix contains '{' or '}'. A brace
// in the prefix would become the hash tag of every key and defeat the
// per-group slot placement that Keyspace guarantees.
var ErrInvalidPrefix = errors.New("redisecho: key prefix must not contain '{' or '}'")

// Keyspace builds every key the library writes. Keys are cluster-safe by
// construction:
//
//   - every key starts with the prefix (DefaultPrefix for the zero value);
//   - keys of one Group share exactly one hash tag, so multi-key commands and
//     Lua scripts over a group never cross slots on a Redis Cluster;
//   - every part is escaped, so user input (a URL path, a user ID, a queue
//     name) can neither open nor close a hash tag, nor make two different
//     part lists produce the same key.
//
// Escaping is percent-encoding of exactly four bytes: '%' (%25), ':' (%3A),
// '{' (%7B) and '}' (%7D). Everything else is kept as is, so keys stay
// readable in redis-cli. A part longer than MaxKeyPart (256 bytes) once
// escaped is digested, keeping a readable head, so every key has a bounded
// length whatever a client sends. Use Digest for parts that are secret.
//
// The zero value is ready to use and writes under DefaultPrefix.
type Keyspace struct {
	prefix string
	set    bool
}

// NewKeyspace returns a Keyspace writing under prefix. An empty prefix means
// DefaultPrefix. It returns ErrInvalidPrefix when prefix contains a brace.
func NewKeyspace(prefix string) (Keyspace, error) {
	if strings.ContainsAny(prefix, "{}") {
		return Keyspace{}, fmt.Errorf("%w: %q", ErrInvalidPrefix, prefix)
	}
	if prefix == "" {
		return Keyspace{}, nil
	}
	return Keyspace{prefix: prefix, set: true}, nil
}

// Prefix returns the namespace prefix of every key built by ks.
func (ks Keyspace) Prefix() string {
	if !ks.set {
		return DefaultPrefix
	}
	return ks.prefix
}

// Key returns an ungrouped key, prefix + escaped parts joined by ':'. Use it
// for keys that no command touches together with another key. It never
// contains a hash tag, whatever the parts hold.
func (ks Keyspace) Key(parts ...string) string {
	var b strings.Builder
	b.Grow(len(ks.Prefix()) + partsLen(parts))
	b.WriteString(ks.Prefix())
	writeParts(&b, parts)
	return b.String()
}

// Group returns the builder of keys that share the hash tag made of the
// escaped tag parts, e.g. Group("queue", "emails").Key("pending") is
// "redisecho:{queue:emails}:pending". An empty tag is written as "{%}", which
// no escaped input can produce, so a group never falls back to hashing whole
// keys.
func (ks Keyspace) Group(tag ...string) KeyGroup {
	var b strings.Builder
	b.Grow(len(ks.Prefix()) + partsLen(tag) + 2)
	b.WriteString(ks.Prefix())
	b.WriteByte('{')
	n := b.Len()
	writeParts(&b, tag)
	if b.Len() == n {
		b.WriteByte('%')
	}
	b.WriteByte('}')
	return KeyGroup{head: b.String()}
}

// KeyGroup builds keys that share one hash tag, and therefore one cluster
// slot. Build it with Keyspace.Group.
type KeyGroup struct {
	head string // prefix + "{" + tag + "}"
}

// Key returns the group's key for the escaped parts:
// prefix + "{" + tag + "}" + (":" + part)...
func (g KeyGroup) Key(parts ...string) string {
	var b strings.Builder
	b.Grow(len(g.head) + partsLen(parts) + 1)
	b.WriteString(g.head)
	for _, p := range parts {
		b.WriteByte(':')
		escapePart(&b, p)
	}
	return b.String()
}

// Tag returns the hash tag of the group, braces included.
func (g KeyGroup) Tag() string {
	return g.head[strings.IndexByte(g.head, '{'):]
}

// Digest returns a fixed-length (43 character), key-safe stand-in for s: the
// unpadded base64url SHA-256 of s. Use it as a key part for input that is long
// (a URL with its query) or secret (a session token): the key stays short and
// a Redis dump or MONITOR log does not reveal s.
func Digest(s string) string {
	sum := sha256.Sum256([]byte(s))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func partsLen(parts []string) int {
	n := 0
	for _, p := range parts {
		n += min(len(p), MaxKeyPart) + 1
	}
	return n
}

func writeParts(b *strings.Builder, parts []string) {
	for i, p := range parts {
		if i > 0 {
			b.WriteByte(':')
		}
		escapePart(b, p)
	}
}

// MaxKeyPart bounds every key part the library writes, in bytes after
// escaping, so that no request can make Redis store a long key (a 1 MB URL
// path, header or user ID). A part that would be longer is written as its
// first escaped bytes, at most KeptPartHead of them and cut on a UTF-8
// boundary, then the mark "%~", then the 43-character Digest of the whole
// part: at most KeptPartHead+45 bytes. Escaping never writes "%~", so a
// digested part equals no part kept as is, and the readable head keeps SCAN
// patterns (cache Flush prefixes up to KeptPartHead bytes) working.
const MaxKeyPart = 256

// KeptPartHead is how many escaped bytes of a part longer than MaxKeyPart
// its digested form keeps, to stay readable.
const KeptPartHead = 64

// escapePart writes p percent-encoding '%', ':', '{' and '}', digesting it
// past MaxKeyPart.
func escapePart(b *strings.Builder, p string) {
	if escapedLen(p) > MaxKeyPart {
		head := 0
		for n := 0; head < len(p); head++ {
			w := 1
			if strings.IndexByte("%:{}", p[head]) >= 0 {
				w = 3
			}
			if n+w > KeptPartHead {
				break
			}
			n += w
		}
		for head > 0 && head < len(p) && p[head]&0xC0 == 0x80 {
			head-- // do not cut a UTF-8 sequence
		}
		writeEscaped(b, p[:head])
		b.WriteString("%~")
		b.WriteString(Digest(p))
		return
	}
	writeEscaped(b, p)
}

// escapedLen is the length of p once escaped.
func escapedLen(p string) int {
	n := len(p)
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '%', ':', '{', '}':
			n += 2
		}
	}
	return n
}

func writeEscaped(b *strings.Builder, p string) {
	for i := 0; i < len(p); i++ {
		switch c := p[i]; c {
		case '%':
			b.WriteString("%25")
		case ':':
			b.WriteString("%3A")
		case '{':
			b.WriteString("%7B")
		case '}':
			b.WriteString("%7D")
		default:
			b.WriteByte(c)
		}
	}
}

// keySlot returns the Redis Cluster slot of key: CRC16 (XMODEM) of the hash
// tag, or of the whole key when it has none, modulo 16384.
func keySlot(key string) uint16 {
	if open := strings.IndexByte(key, '{'); open >= 0 {
		if end := strings.IndexByte(key[open+1:], '}'); end > 0 {
			key = key[open+1 : open+1+end]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % 16384
}

// masters returns one client per master node: the single node of a
// standalone or sentinel client, every master of a cluster. Replicas are left
// out, because a write sent through one fails with MOVED and a SCAN of both
// would see every key twice. The ROLE calls run concurrently under ctx (so
// a node that hangs does not eat the others' deadline). A node that does not
// answer is an error, unless the slot map is known and does not list it as
// a master (a replica that is down holds no key of its own).
func masters(ctx context.Context, client rueidis.Client) ([]rueidis.Client, error) {
	nodes := client.Nodes()
	out := make([]rueidis.Client, 0, len(nodes))
	if client.Mode() != rueidis.ClientModeCluster {
		for addr, n := range nodes {
			out = append(out, addressed{Client: n, addr: addr})
		}
		return out, nil
	}
	slots := stateOf(client).slots.Load()
	type role struct {
		addr   string
		n      rueidis.Client
		master bool
		err    error
	}
	roles := make(chan role, len(nodes))
	for addr, n := range nodes {
		go func() {
			r := role{addr: addr, n: n}
			reply, err := n.Do(ctx, n.B().Role().Build()).ToArray()
			switch {
			case err != nil && slots != nil && !slices.Contains(slots[:], addr):
			case err != nil:
				r.err = fmt.Errorf("redisecho: ROLE on %s: %w", addr, err)
			case len(reply) > 0:
				s, _ := reply[0].ToString()
				r.master = s == "master"
			}
			roles <- r
		}()
	}
	var err error
	for range nodes {
		r := <-roles
		if r.err != nil && err == nil {
			err = r.err
		}
		if r.master {
			out = append(out, addressed{Client: r.n, addr: r.addr})
		}
	}
	if err != nil {
		return nil, err
	}
	sort.Slice(out, func(i, j int) bool { return out[i].(addressed).addr < out[j].(addressed).addr })
	return out, nil
}

// addressed is a node client that knows its address.
type addressed struct {
	rueidis.Client
	addr string
}

// scanMasters runs SCAN MATCH pattern over every master (see masters) and
// calls fn with each batch of keys, together with the node that holds them so
// that fn can act on them there. A batch holds keys of one node only. It stops
// at the first error, from Redis or from fn.
func scanMasters(ctx context.Context, client rueidis.Client, pattern string, fn func(ctx context.Context, node rueidis.Client, keys []string) error) error {
	nodes, err := masters(ctx, client)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		var cursor uint64
		for {
			entry, err := n.Do(ctx, n.B().Scan().Cursor(cursor).Match(pattern).Count(500).Build()).AsScanEntry()
			if err != nil {
				return fmt.Errorf("redisecho: SCAN: %w", err)
			}
			if len(entry.Elements) > 0 {
				if err := fn(ctx, n, entry.Elements); err != nil {
					return err
				}
			}
			cursor = entry.Cursor
			if cursor == 0 {
				break
			}
		}
	}
	return nil
}

// matchPattern returns the SCAN MATCH pattern for every key that starts with
// prefix, escaping the glob metacharacters it contains.
func matchPattern(prefix string) string {
	var b strings.Builder
	for i := 0; i < len(prefix); i++ {
		switch c := prefix[i]; c {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('*')
	return b.String()
}

// ClientHolder dials Redis in the background and keeps retrying until it
// connects, so that an application can start while Redis is down.
// rueidis.NewClient fails when no server answers (a cluster client needs the
// topology), and it reconnects by itself only once it has connected. The
// holder owns the client it creates and closes it in Close.
type ClientHolder struct {
	opt    rueidis.ClientOption
	client atomic.Pointer[rueidis.Client]
	err    atomic.Pointer[error]
	ready  chan struct{}
	stop   chan struct{}
	done   chan struct{}
	start  sync.Once
	close  sync.Once
}

// DefaultConnWriteTimeout is the rueidis ConnWriteTimeout of the clients a
// ClientHolder builds when the option leaves it zero. rueidis drops a
// connection whose keep-alive PING gets no answer within it, and with the
// connection its client-side cache. The PING goes out on a timer of
// Dialer.KeepAlive (1 s by default) that skips any tick which saw a reply,
// so this bounds how long an instance cut off from Redis serves cached
// reads (sessions, cache entries) that other instances may have changed to
// 2 × KeepAlive + ConnWriteTimeout: 4 s (measured: 3.8 to 4.0 s). rueidis's
// own default, 10 × KeepAlive, lets that last 12 s. Set it on the clients
// you build yourself too.
const DefaultConnWriteTimeout = 2 * time.Second

// NewClientHolder returns a holder for a client built from opt, with
// ConnWriteTimeout defaulting to DefaultConnWriteTimeout (2 s). It does no
// I/O: call Start.
func NewClientHolder(opt rueidis.ClientOption) *ClientHolder {
	if opt.ConnWriteTimeout == 0 {
		opt.ConnWriteTimeout = DefaultConnWriteTimeout
	}
	return &ClientHolder{opt: opt, ready: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
}

// Start begins dialing in the background, retrying with a backoff that grows
// from 100 ms to 5 s until it connects or Close is called. Calling Start again
// does nothing.
func (h *ClientHolder) Start() {
	h.start.Do(func() {
		go func() {
			defer close(h.done)
			backoff := 100 * time.Millisecond
			for {
				c, err := rueidis.NewClient(h.opt)
				if err == nil {
					select {
					case <-h.stop:
						c.Close()
						return
					default:
					}
					h.client.Store(&c)
					close(h.ready)
					return
				}
				h.err.Store(&err)
				select {
				case <-h.stop:
					return
				case <-time.After(backoff):
				}
				backoff = min(backoff*2, 5*time.Second)
			}
		}()
	})
}

// Client returns the connected client, or nil until the first dial succeeded.
func (h *ClientHolder) Client() rueidis.Client {
	if c := h.client.Load(); c != nil {
		return *c
	}
	return nil
}

// Ready is closed once Client returns a client.
func (h *ClientHolder) Ready() <-chan struct{} { return h.ready }

// Err returns the error of the last failed dial, nil if none failed yet.
func (h *ClientHolder) Err() error {
	if e := h.err.Load(); e != nil {
		return *e
	}
	return nil
}

// Close stops dialing and closes the client the holder created.
func (h *ClientHolder) Close() {
	h.close.Do(func() {
		close(h.stop)
		h.start.Do(func() { close(h.done) }) // never started: nothing to wait for
		<-h.done
		if c := h.Client(); c != nil {
			c.Close()
		}
	})
}

// DefaultHealthTimeout bounds a readiness check when ReadinessConfig.Timeout
// is zero.
const DefaultHealthTimeout = time.Second

// ReadinessConfig configures the readiness handler, the guide's "monitor
// Redis health with health check endpoints".
type ReadinessConfig struct {
	// Client is the Redis to check. Exactly one of Client and Holder is
	// required.
	Client rueidis.Client
	// Holder is the Redis to check when the application dials in the
	// background: until it connects, readiness answers 503 "connecting".
	Holder *ClientHolder
	// Timeout bounds the whole check: the handler answers within it even
	// when Redis hangs. Default: DefaultHealthTimeout (1 s).
	Timeout time.Duration
	// Breaker is the breaker whose scopes are reported; any scope that is
	// not closed makes the answer 503. Default: BreakerFor(client).
	Breaker *Breaker
	// Detail adds each master's address and round trip, and each breaker
	// scope's counters, to the report. Off by default, since readiness is
	// usually reachable without authentication. Default: false.
	Detail bool
	// UnavailableWhenOOM makes readiness answer 503 while a master refuses
	// writes for lack of memory (state "oom"). By default it answers 200
	// with state "oom": reads still work in a full Redis, and a 503 would
	// take every instance out of the load balancer at once. Default: false.
	UnavailableWhenOOM bool
}

// HealthReport is the JSON body of the readiness handler.
type HealthReport struct {
	// Status is "ok" (HTTP 200) or "unavailable" (HTTP 503).
	Status string `json:"status"`
	// Redis describes what the check found.
	Redis RedisHealth `json:"redis"`
}

// RedisHealth is the Redis part of a HealthReport.
type RedisHealth struct {
	// State is "up", "oom" (a master answers but refuses writes for lack of
	// memory: see ReadinessConfig.UnavailableWhenOOM), "down",
	// "breaker-open" or "connecting".
	State string `json:"state"`
	// Error says why a ClientHolder has not connected yet ("connecting"),
	// as one of the fixed codes of DialErrorCode; never internal text.
	Error string `json:"error,omitempty"`
	// Mode is the client's mode: "standalone", "cluster" or "sentinel".
	Mode string `json:"mode,omitempty"`
	// LatencyMS is the slowest node's PING round trip, in milliseconds.
	LatencyMS float64 `json:"latency_ms"`
	// Breaker is "closed" when every breaker scope is closed, else "open".
	Breaker string `json:"breaker"`
	// Nodes reports each master (with ReadinessConfig.Detail).
	Nodes []NodeHealth `json:"nodes,omitempty"`
	// Scopes reports each breaker scope (with ReadinessConfig.Detail).
	Scopes []BreakerStats `json:"scopes,omitempty"`
}

// NodeHealth is one node's PING result. Error is "timeout" or "unreachable":
// the underlying error goes to no HTTP client.
type NodeHealth struct {
	// Addr is the master's address.
	Addr string `json:"addr"`
	// OK reports whether it answered PING within the deadline.
	OK bool `json:"ok"`
	// LatencyMS is its PING round trip, in milliseconds.
	LatencyMS float64 `json:"latency_ms"`
	// Error is "timeout" or "unreachable" when OK is false.
	Error string `json:"error,omitempty"`
}

// Readiness returns the readiness handler for client with the defaults of
// ReadinessConfig. It PINGs every node under a 1 s deadline and answers 200
// with a HealthReport, or 503 when a node does not answer or a breaker scope
// is open. It panics when client is nil.
func Readiness(client rueidis.Client) echo.HandlerFunc {
	return ReadinessWithConfig(ReadinessConfig{Client: client})
}

// ReadinessWithConfig returns the readiness handler for cfg. It panics when
// cfg is invalid; use ToHandler to get the error instead.
func ReadinessWithConfig(cfg ReadinessConfig) echo.HandlerFunc {
	return must(cfg.ToHandler())
}

// ToHandler validates cfg, fills its defaults and returns the handler.
func (cfg ReadinessConfig) ToHandler() (echo.HandlerFunc, error) {
	if (cfg.Client == nil) == (cfg.Holder == nil) {
		return nil, fmt.Errorf("readiness: %w: set exactly one of Client and Holder", ErrNilClient)
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("readiness: %w: %v", ErrInvalidTimeout, cfg.Timeout)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultHealthTimeout
	}
	return func(c echo.Context) error {
		c.Response().Header().Set("Cache-Control", "no-store")
		client := cfg.Client
		if cfg.Holder != nil {
			client = cfg.Holder.Client()
		}
		if client == nil {
			rep := HealthReport{Status: "unavailable", Redis: RedisHealth{State: "connecting"}}
			if err := cfg.Holder.Err(); err != nil {
				rep.Redis.Error = DialErrorCode(err)
			}
			return c.JSON(http.StatusServiceUnavailable, rep)
		}
		breaker := cfg.Breaker
		if breaker == nil {
			breaker = BreakerFor(client)
		}
		ctx, cancel := context.WithTimeout(c.Request().Context(), cfg.Timeout)
		defer cancel()
		rep := checkRedis(c.Request().Context(), ctx, client, breaker)
		if !cfg.Detail {
			rep.Redis.Nodes, rep.Redis.Scopes = nil, nil
		}
		if rep.Redis.State == "oom" && cfg.UnavailableWhenOOM {
			rep.Status = "unavailable"
		}
		code := http.StatusOK
		if rep.Status != "ok" {
			code = http.StatusServiceUnavailable
		}
		return c.JSON(code, rep)
	}, nil
}

// DialErrorCode names why connecting to Redis failed with one fixed code,
// for health reports and logs that must not carry internal text:
//
//   - "auth": Redis refused the credentials (WRONGPASS, NOAUTH, NOPERM);
//   - "refused": nothing listens at the address;
//   - "timeout": no answer within the dial timeout;
//   - "protocol": something answered that is not a Redis server, or a Redis
//     server refused the handshake for another reason;
//   - "unreachable": any other network failure (DNS, reset, no route).
//
// It returns "" for a nil error.
func DialErrorCode(err error) string {
	if err == nil {
		return ""
	}
	if re, ok := rueidis.IsRedisErr(err); ok {
		for _, p := range []string{"WRONGPASS", "NOAUTH", "NOPERM"} {
			if strings.HasPrefix(re.Error(), p) {
				return "auth"
			}
		}
		return "protocol"
	}
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.As(err, &ne), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return "unreachable"
	}
	return "protocol"
}

// checkRedis probes every node concurrently under ctx: PING on a standalone
// server, ROLE on a cluster (the round trip and the role in one call),
// pipelined with INFO memory, so that a full Redis (noeviction, maxmemory
// reached) reads "oom" even when no write has been refused yet.
// Replicas are left out: a missing replica does not stop this instance from
// serving. A node that does not answer counts as a master, and as down,
// unless the cluster's slot map (see clientState.nodeOf) is known and does
// not list it as a master; a master's failure feeds its breaker scope, and
// on a cluster asks for a fresh slot map (a failover may have moved its
// slots). A master of the slot map that the client does not list counts as
// down too.
//
// parent is the request's context, ctx the check's (parent with the check's
// deadline): a probe that fails because the HTTP client went away proves
// nothing about Redis.
func checkRedis(parent, ctx context.Context, client rueidis.Client, breaker *Breaker) HealthReport {
	rep := HealthReport{Status: "ok", Redis: RedisHealth{State: "up", Mode: string(client.Mode()), Breaker: "closed"}}
	cluster := client.Mode() == rueidis.ClientModeCluster
	nodes := client.Nodes()
	var st *clientState
	var slotMasters map[string]bool // nil: not known yet, every node that fails counts
	if cluster {
		st = stateOf(client)
		if m := st.slots.Load(); m != nil {
			slotMasters = make(map[string]bool, 8)
			for i := 0; i < len(m); i++ {
				if i == 0 || m[i] != m[i-1] {
					slotMasters[m[i]] = true
				}
			}
		} else {
			st.refreshSlots(client, DefaultTimeout)
		}
	}
	type probe struct {
		h      NodeHealth
		master bool
	}
	results := make(chan probe, len(nodes))
	for addr, n := range nodes {
		go func() {
			start := time.Now()
			p := probe{h: NodeHealth{Addr: addr}, master: true}
			scope := "redis"
			if cluster {
				scope = addr
			}
			bn := breaker.node(scope)
			// Once an open scope's cool-down has passed, this probe is its
			// half-open probe: an instance that readiness took out of the
			// load balancer gets no calls that could close it.
			probing := !bn.closed() && breaker.allow(bn)
			probeCmd := n.B().Ping().Build()
			if cluster {
				probeCmd = n.B().Role().Build()
			}
			res := n.DoMulti(ctx, probeCmd, n.B().Info().Section("memory").Build())
			err := res[0].Error()
			switch {
			case cluster && err == nil:
				if role, _ := res[0].ToArray(); len(role) > 0 {
					r, _ := role[0].ToString()
					p.master = r == "master"
				}
			case cluster:
				p.master = slotMasters == nil || slotMasters[addr]
			}
			if info, ierr := res[1].ToString(); err == nil && ierr == nil && p.master && fullRedis(info) {
				bn.markOOM(breaker.clock.Now())
			}
			p.h.OK, p.h.LatencyMS = err == nil, float64(time.Since(start).Microseconds())/1000
			switch {
			case err == nil:
			case errors.Is(err, context.DeadlineExceeded):
				p.h.Error = "timeout"
			default:
				p.h.Error = "unreachable"
			}
			// A failed probe is evidence against the node, as any call's
			// failure is: it feeds the node's breaker scope, so that an
			// instance whose reads are all cache hits still learns that
			// Redis is gone. A probe that works does not close an open scope
			// during its cool-down; after it, the probe closes the scope
			// (see probing above).
			if o := classify(parent, err); (o == unhealthy && p.master) || probing {
				breaker.record(bn, o)
				if o == unhealthy && cluster {
					st.refreshSlots(client, DefaultTimeout)
				}
			}
			results <- p
		}()
	}
	for range nodes {
		p := <-results
		if !p.master {
			continue
		}
		rep.Redis.Nodes = append(rep.Redis.Nodes, p.h)
		rep.Redis.LatencyMS = max(rep.Redis.LatencyMS, p.h.LatencyMS)
		if !p.h.OK {
			rep.Status, rep.Redis.State = "unavailable", "down"
		}
	}
	// A master of the slot map that the client no longer lists (rueidis
	// drops a failed node read from CLUSTER SHARDS) serves its slots to no
	// one: it is down, until a fresh slot map shows who took them over.
	for addr := range slotMasters {
		if _, ok := nodes[addr]; !ok && addr != "" {
			rep.Redis.Nodes = append(rep.Redis.Nodes, NodeHealth{Addr: addr, Error: "unreachable"})
			rep.Status, rep.Redis.State = "unavailable", "down"
			st.refreshSlots(client, DefaultTimeout)
		}
	}
	if len(rep.Redis.Nodes) == 0 {
		rep.Status, rep.Redis.State = "unavailable", "down"
	}
	sort.Slice(rep.Redis.Nodes, func(i, j int) bool { return rep.Redis.Nodes[i].Addr < rep.Redis.Nodes[j].Addr })
	rep.Redis.Scopes = breaker.Stats()
	if breaker.AnyOpen() {
		rep.Redis.Breaker = "open"
		if rep.Status == "ok" {
			rep.Status, rep.Redis.State = "unavailable", "breaker-open"
		}
	}
	if rep.Status == "ok" && breaker.AnyOOM() {
		rep.Redis.State = "oom"
	}
	return rep
}

// fullRedis reports whether an INFO memory reply shows a server that
// refuses writes for lack of memory: a maxmemory, reached, under the
// noeviction policy (the other policies evict to make room).
func fullRedis(info string) bool {
	var used, limit int64
	var policy string
	for line := range strings.SplitSeq(info, "\r\n") {
		k, v, _ := strings.Cut(line, ":")
		switch k {
		case "used_memory":
			used, _ = strconv.ParseInt(v, 10, 64)
		case "maxmemory":
			limit, _ = strconv.ParseInt(v, 10, 64)
		case "maxmemory_policy":
			policy = v
		}
	}
	return limit > 0 && used >= limit && policy == "noeviction"
}

// Liveness returns the liveness handler: 200 {"status":"ok"} as long as the
// process serves HTTP. It does not touch Redis, so that an orchestrator does
// not restart every instance during a Redis outage that the cache and the
// limiter are built to survive.
func Liveness() echo.HandlerFunc {
	return func(c echo.Context) error {
		c.Response().Header().Set("Cache-Control", "no-store")
		return c.JSON(http.StatusOK, map[string]string{"status": "ok"})
	}
}
