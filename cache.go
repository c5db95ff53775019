package redisecho

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/redis/rueidis"
)

// Cache defaults.
const (
	// DefaultCacheTTL is how long an entry stays fresh when no TTL is given.
	DefaultCacheTTL = 5 * time.Minute
	// DefaultCacheMaxBody bounds the body of a response the cache stores.
	DefaultCacheMaxBody = 1 << 20
	// DefaultCacheLockTTL bounds how long one fill may hold the fill lock,
	// and how long the other requests wait for it before they compute the
	// value themselves.
	DefaultCacheLockTTL = 5 * time.Second
)

// Cache errors.
var (
	// ErrCacheNotFound is what a Remember function returns to say that the
	// value does not exist; with CacheNotFound it is cached too, and
	// Remember returns it (wrapped) without calling the function again.
	ErrCacheNotFound = errors.New("redisecho: cache: not found")
	// ErrInvalidCacheConfig is returned for out-of-range cache options.
	ErrInvalidCacheConfig = errors.New("redisecho: cache: invalid configuration")
	// ErrNoCacheMiddleware is returned by GetCache when no Cache middleware
	// ran for the request.
	ErrNoCacheMiddleware = errors.New("redisecho: cache: the Cache middleware is not installed on this route")
	// ErrInvalidCacheKey is returned for an empty key or tag.
	ErrInvalidCacheKey = errors.New("redisecho: cache: empty key or tag")
	// ErrCacheOutOfMemory is what Set and InvalidateTags return (wrapped,
	// with Redis's reply when there is one) when Redis refused the write for
	// lack of memory (maxmemory with the noeviction policy), or answered so
	// within the last 2 s. Nothing was written. Reads, Delete and Flush keep
	// working in a full Redis; the middleware and Remember serve misses
	// uncached instead of returning it.
	ErrCacheOutOfMemory = errors.New("redisecho: cache: Redis is out of memory, nothing written")
)

// CacheStore is the Redis side of caching, shared by the response cache
// middleware and the cache service (Get, Set, Remember, Delete,
// InvalidateTags, Flush). Entries are read through rueidis client-side
// caching, so a repeated hit makes no Redis round trip. Build it with
// NewCacheStore; it is safe for concurrent use.
//
// Keys, with K the escaped cache key and T the escaped tag (each at most
// MaxKeyPart = 256 bytes: a longer one keeps its first KeptPartHead = 64
// escaped bytes, then "%~" and its Digest), so that no request can make a
// long key:
//
//	<prefix>{c:K}:e   the entry (one string: metadata, tag generations, value); len(prefix)+262 bytes at most
//	<prefix>{c:K}:l   its fill lock, held by one filler at a time; len(prefix)+262 bytes at most
//	<prefix>tag:T     the tag's generation counter; len(prefix)+260 bytes at most
//
// Tags are versioned: an entry records the generation of each of its tags
// when its fill started, and is a miss once any of them has moved on. So
// InvalidateTags is one INCR per tag whatever the number of entries, leaves
// nothing to clean up, and beats any fill that started before it. A tag
// counter exists, with a TTL, as long as any entry that names it: storing an
// entry creates its counters or extends their TTL, and an invalidation
// keeps a counter TagTTL. A counter is created at a random generation, and
// a missing counter validates no entry, so that a counter evicted under
// allkeys-lru (its hits are served from process memory: it looks idle to
// Redis) and created again never revives an entry invalidated before.
//
// Client-side caching and Redis's tracking table: a tracked read of a key
// leaves an entry in Redis's tracking table until the key changes or
// expires, even after the reading client has gone. So the store reads
// through client-side caching only keys that it knows exist with a TTL (an
// entry it has seen or written, the tag counters of a stored entry, a fill
// lock it is about to write); a key derived from a request that may never be
// written (the entry of a junk URL, say) is read untracked. Warm hits stay
// free: an instance serves an entry from process memory from its second hit
// on when it stored the entry, from its third when another instance did.
type CacheStore struct {
	b   *backend
	cfg CacheStoreConfig
	*cacheLocal

	hits, misses, fills, waits, errors atomic.Uint64

	keyMemo  sync.Map // cache key -> *entryRef
	keyMemoN atomic.Int64
}

// cacheLocal is the in-process state that every CacheStore on one client and
// prefix shares, so that a handler invalidating through one store is seen
// at once by a middleware reading through another.
type cacheLocal struct {
	// Read-your-own-invalidation: what this instance invalidated, until
	// Redis's invalidation message has surely reached its local cache.
	tagFloor sync.Map     // tag key -> tagFloor: generation after our INCR
	recent   sync.Map     // entry key -> recentMark: our last write or delete
	epoch    atomic.Int64 // incremented by every invalidation made here
	marks    atomic.Int64 // marks since the last sweep

	flight sync.Map // entry key -> *cacheFill: in-process coalescing

	decoded      sync.Map // entry key -> *entry, immutable once stored
	decodedN     atomic.Int64
	decodedBytes atomic.Int64 // encoded size of the decoded entries, about

	// The entries known to exist in Redis, read through client-side
	// caching, by the fingerprints of their keys (see knownFP), in buckets
	// of knownWays slots: a key is forgotten (and costs one untracked read)
	// only when knownWays others of its bucket were seen since. 512 KiB, so
	// that far more entries than the key memo holds stay tracked: with one
	// slot per fingerprint, two hot keys of one slot took turns, and each
	// of their hits cost a round trip for good (about 60 of 2,000 hot
	// keys); in 8,192 buckets of 8, a hot set of 8,192 keys fits (a bucket
	// over capacity: 1% likely), one of 20,000 overflows about 8 buckets.
	known [knownSlots]atomic.Uint64
	// knownUntil[i] is when the entry of known[i] expires (unix ms, the
	// store's clock): past it the entry is read untracked again, so that a
	// read of an entry that expired (a Get, a fill that stores nothing)
	// leaves no tracking entry for a key that no longer exists. Another
	// 512 KiB.
	knownUntil [knownSlots]atomic.Int64
}

const (
	knownSlots = 1 << 16
	knownWays  = 8
)

// fingerprintSeed seeds the entry keys' fingerprints (per process).
var fingerprintSeed = maphash.MakeSeed()

// CacheStoreConfig configures a CacheStore.
type CacheStoreConfig struct {
	// Client is the rueidis client. Required.
	Client rueidis.Client
	// Options is the shared plumbing (Prefix, Timeout, Breaker, Clock,
	// Logger), with their defaults.
	Options
	// LockTTL bounds a fill: the fill lock expires after it, and requests
	// waiting for another instance's fill give up and compute the value
	// themselves after it. Default: 5 s.
	LockTTL time.Duration
	// RecentWindow is how long this instance bypasses its local cache for
	// an entry it deleted or a flush it ran, until Redis's invalidation has
	// surely arrived (measured: well under 20 ms on loopback). Default: 1 s.
	RecentWindow time.Duration
	// Codec encodes the service's values (Set, Get, Remember). Default:
	// JSONCodec.
	Codec Codec
	// TagTTL is how long a tag's generation counter lives after its last
	// invalidation, so tags never pile up (a counter also lives as long as
	// the entries that name it, plus 5 s). Tagged entries live at most this
	// long (their TTL is capped), which keeps a recycled counter from
	// reviving an old entry. Default: 7 days.
	TagTTL time.Duration
}

// NewCacheStore validates cfg, fills its defaults and returns the store. It
// does no I/O.
func NewCacheStore(cfg CacheStoreConfig) (*CacheStore, error) {
	b, err := newBackend("cache", cfg.Client, cfg.Options)
	if err != nil {
		return nil, err
	}
	if cfg.LockTTL < 0 || cfg.RecentWindow < 0 || cfg.TagTTL < 0 {
		return nil, fmt.Errorf("%w: negative LockTTL, RecentWindow or TagTTL", ErrInvalidCacheConfig)
	}
	if cfg.TagTTL == 0 {
		cfg.TagTTL = 7 * 24 * time.Hour
	}
	if cfg.LockTTL == 0 {
		cfg.LockTTL = DefaultCacheLockTTL
	}
	if cfg.LockTTL < time.Millisecond {
		return nil, fmt.Errorf("%w: LockTTL must be at least 1 ms", ErrInvalidCacheConfig)
	}
	if cfg.RecentWindow == 0 {
		cfg.RecentWindow = time.Second
	}
	if cfg.Codec == nil {
		cfg.Codec = JSONCodec{}
	}
	local, ok := b.shared.caches.Load(b.keys.Prefix())
	if !ok {
		local, _ = b.shared.caches.LoadOrStore(b.keys.Prefix(), &cacheLocal{})
	}
	return &CacheStore{b: b, cfg: cfg, cacheLocal: local.(*cacheLocal)}, nil
}

// CacheStats counts what a CacheStore did since it was created.
type CacheStats struct {
	// Hits counts reads answered by a fresh (or servable stale) entry.
	Hits uint64
	// Misses counts reads that found no usable entry.
	Misses uint64
	// Fills counts values computed and stored by this instance.
	Fills uint64
	// Waits counts reads that waited for another fill, here or elsewhere.
	Waits uint64
	// Errors counts Redis failures the cache absorbed.
	Errors uint64
}

// Stats returns the store's counters.
func (cs *CacheStore) Stats() CacheStats {
	return CacheStats{Hits: cs.hits.Load(), Misses: cs.misses.Load(), Fills: cs.fills.Load(), Waits: cs.waits.Load(), Errors: cs.errors.Load()}
}

// entryKey returns the Redis key of key's entry.
func (cs *CacheStore) entryKey(key string) string { return cs.entry(key).ek }

// entryRef is a remembered entry key with its prebuilt, pinned GET: a hot
// key then costs a map lookup instead of escaping, building a command and
// hashing its slot on every read. (A pinned command is never recycled by
// rueidis, so sharing it between concurrent reads is safe, through DoCache
// and, converted, through Do.)
type entryRef struct {
	ek  string
	get rueidis.Cacheable
	fp  uint64 // knownFP(ek)
}

// knownFP is the fingerprint of an entry key in cacheLocal.known: never 0,
// the empty slot.
func knownFP(ek string) uint64 { return maphash.String(fingerprintSeed, ek) | 1 }

// knownBucket returns the index of the first of the slots where fp may be.
func knownBucket(fp uint64) int { return int((fp >> 1) % (knownSlots / knownWays) * knownWays) }

// knownMargin is how long before its expiry a known entry is read
// untracked again: the expiry is the writer's clock, Redis counts the TTL
// from when the write arrived.
const knownMargin = 100 * time.Millisecond

// isKnown reports whether ref's entry exists in Redis as far as this
// instance knows: then it is read through client-side caching.
func (cs *CacheStore) isKnown(ref *entryRef) bool {
	now := cs.b.clock.Now().UnixMilli()
	for i := knownBucket(ref.fp); i < knownBucket(ref.fp)+knownWays; i++ {
		if cs.known[i].Load() == ref.fp {
			return now < cs.knownUntil[i].Load()
		}
	}
	return false
}

// setKnown records that ref's entry e exists, until it expires.
func (cs *CacheStore) setKnown(ref *entryRef, e *entry) {
	cs.remember(ref.fp, e.stale-knownMargin.Milliseconds())
}

// remember records fp in its bucket, until until (unix ms): in its slot, a
// free one, or in place of a random one when the bucket is full. (Another
// goroutine may replace the slot between the two stores: at worst one read
// is tracked or untracked when it need not be.)
func (cl *cacheLocal) remember(fp uint64, until int64) {
	first := knownBucket(fp)
	for i := first; i < first+knownWays; i++ {
		if cl.known[i].Load() == fp {
			cl.knownUntil[i].Store(until)
			return
		}
	}
	for i := first; i < first+knownWays; i++ {
		if cl.known[i].CompareAndSwap(0, fp) {
			cl.knownUntil[i].Store(until)
			return
		}
	}
	i := first + mrand.IntN(knownWays)
	cl.knownUntil[i].Store(until)
	cl.known[i].Store(fp)
}

// forget removes fp from its bucket (every copy: two concurrent remembers
// may both have stored it).
func (cl *cacheLocal) forget(fp uint64) {
	first := knownBucket(fp)
	for i := first; i < first+knownWays; i++ {
		cl.known[i].CompareAndSwap(fp, 0)
	}
}

// longKey is the memo key of a cache key longer than MaxKeyPart: its entry
// key, which is bounded, so that the memo never holds a long request's key.
type longKey string

func (cs *CacheStore) entry(key string) *entryRef {
	var memo any = key
	if len(key) > MaxKeyPart {
		memo = longKey(cs.b.keys.Group("c", key).Key("e"))
	}
	if v, ok := cs.keyMemo.Load(memo); ok {
		return v.(*entryRef)
	}
	ek := cs.b.keys.Group("c", key).Key("e")
	ref := &entryRef{ek: ek, get: cs.b.client.B().Get().Key(ek).Cache().Pin(), fp: knownFP(ek)}
	if cs.keyMemoN.Add(1) > maxDecoded {
		cs.keyMemo.Clear()
		cs.keyMemoN.Store(0)
	}
	v, _ := cs.keyMemo.LoadOrStore(memo, ref)
	return v.(*entryRef)
}

func (cs *CacheStore) lockKey(key string) string { return cs.b.keys.Group("c", key).Key("l") }
func (cs *CacheStore) tagKey(tag string) string  { return cs.b.keys.Key("tag", tag) }

// An entry is what one cache key holds. The stored form is binary:
//
//	"RE2" | flags u8 | stored, fresh, stale (unix ms, 3×i64) | id u64 | status u16 |
//	tags: n u16, then (len u16, tag counter key, generation i64)… |
//	headers: n u16, then (len u16, name, len u32, value)… | body (the rest)
//
// Tags are recorded by their counter's key, which is bounded (see
// CacheStore), not by name: a tag made of request data never makes an
// entry long. A value that does not parse is a miss, never a panic; an
// entry of the previous format ("RE1", tags by name) is a miss that the next
// fill replaces.
type entry struct {
	notFound bool // a cached "not found" (Remember with CacheNotFound)
	stored   int64
	fresh    int64  // fresh until
	stale    int64  // servable, stale, until (>= fresh)
	id       uint64 // random: tells this write from any other
	status   int
	tags     []tagGen
	header   http.Header
	body     []byte

	// Set on a response just captured, not stored.
	rawHeader http.Header // the handler's full response header
	tooBig    bool        // the body exceeded MaxBodySize
}

type tagGen struct {
	tag string // the tag counter's key
	gen int64
}

const (
	entryMagic         = "RE2"
	oldEntryMagic      = "RE1"
	flagNotFound  byte = 1
)

func (e *entry) encode() []byte {
	n := len(entryMagic) + 1 + 32 + 2 + 2 + 2 + len(e.body)
	for _, t := range e.tags {
		n += 2 + len(t.tag) + 8
	}
	for k, vs := range e.header {
		for _, v := range vs {
			n += 2 + len(k) + 4 + len(v)
		}
	}
	b := make([]byte, 0, n)
	b = append(b, entryMagic...)
	var flags byte
	if e.notFound {
		flags |= flagNotFound
	}
	b = append(b, flags)
	b = binary.BigEndian.AppendUint64(b, uint64(e.stored))
	b = binary.BigEndian.AppendUint64(b, uint64(e.fresh))
	b = binary.BigEndian.AppendUint64(b, uint64(e.stale))
	b = binary.BigEndian.AppendUint64(b, e.id)
	b = binary.BigEndian.AppendUint16(b, uint16(e.status))
	b = binary.BigEndian.AppendUint16(b, uint16(len(e.tags)))
	for _, t := range e.tags {
		b = binary.BigEndian.AppendUint16(b, uint16(len(t.tag)))
		b = append(b, t.tag...)
		b = binary.BigEndian.AppendUint64(b, uint64(t.gen))
	}
	nh := 0
	for _, vs := range e.header {
		nh += len(vs)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(nh))
	for k, vs := range e.header {
		for _, v := range vs {
			b = binary.BigEndian.AppendUint16(b, uint16(len(k)))
			b = append(b, k...)
			b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
			b = append(b, v...)
		}
	}
	return append(b, e.body...)
}

var (
	errCorruptEntry = errors.New("redisecho: cache: corrupt entry")
	errOldEntry     = errors.New("redisecho: cache: entry of the previous format")
)

// decodeEntry parses s; the body aliases a copy of s.
func decodeEntry(s string) (*entry, error) {
	if strings.HasPrefix(s, oldEntryMagic) {
		return nil, errOldEntry
	}
	b := []byte(s)
	if len(b) < len(entryMagic)+1+32+2+2 || string(b[:3]) != entryMagic {
		return nil, errCorruptEntry
	}
	e := &entry{notFound: b[3]&flagNotFound != 0}
	p := b[4:]
	e.stored = int64(binary.BigEndian.Uint64(p))
	e.fresh = int64(binary.BigEndian.Uint64(p[8:]))
	e.stale = int64(binary.BigEndian.Uint64(p[16:]))
	e.id = binary.BigEndian.Uint64(p[24:])
	e.status = int(binary.BigEndian.Uint16(p[32:]))
	p = p[34:]
	nt := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	for range nt {
		if len(p) < 2 {
			return nil, errCorruptEntry
		}
		l := int(binary.BigEndian.Uint16(p))
		if len(p) < 2+l+8 {
			return nil, errCorruptEntry
		}
		e.tags = append(e.tags, tagGen{tag: string(p[2 : 2+l]), gen: int64(binary.BigEndian.Uint64(p[2+l:]))})
		p = p[2+l+8:]
	}
	if len(p) < 2 {
		return nil, errCorruptEntry
	}
	nh := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if nh > 0 {
		e.header = make(http.Header, nh)
	}
	for range nh {
		if len(p) < 2 {
			return nil, errCorruptEntry
		}
		kl := int(binary.BigEndian.Uint16(p))
		if len(p) < 2+kl+4 {
			return nil, errCorruptEntry
		}
		k := string(p[2 : 2+kl])
		p = p[2+kl:]
		vl := int(binary.BigEndian.Uint32(p))
		if len(p) < 4+vl {
			return nil, errCorruptEntry
		}
		e.header[k] = append(e.header[k], string(p[4:4+vl]))
		p = p[4+vl:]
	}
	if e.stale < e.fresh || e.status < 0 || e.status > 999 {
		return nil, errCorruptEntry
	}
	for k, vs := range e.header {
		e.header[k] = slices.Clip(vs) // shared by every hit: an append must copy
	}
	e.body = p
	return e, nil
}

// lookup is the outcome of reading one key.
type lookup struct {
	e     *entry
	fresh bool // usable as is
	stale bool // usable, but a refresh is due
	// res is how get answered, for ObsCacheRequest: ResultHit or
	// ResultStale (found), ResultMiss (computed and storable, or waited
	// for another fill), ResultUncacheable (computed, not storable) or
	// ResultBypass (Redis failed: computed uncached).
	res Result
}

// read returns the entry stored under key if it is still valid: its tags'
// generations unchanged, and fresh or within its stale grace. A corrupt
// entry is a miss. Errors are Redis failures.
func (cs *CacheStore) read(ctx context.Context, key string) (lookup, error) {
	e, err := cs.readEntry(ctx, cs.entry(key))
	if err != nil || e == nil {
		return lookup{}, err
	}
	return cs.validate(ctx, e)
}

// readEntry reads ref's entry: nil for none. An entry this instance knows
// to exist is read through client-side caching, the hit path: served from
// process memory, no Redis command. Any other is read untracked, because a
// tracked read of a key that is never written (the entry of a junk URL
// whose response is not stored) would stay in Redis's tracking table for
// good; once that read finds the entry, or this instance stores it, the
// next read is tracked, and the entry's expiry, deletion or replacement
// removes the tracking entry. An entry is known until it expires (then it
// is read untracked again, and a read of it leaves nothing); a tracked read
// that finds nothing (deleted by another instance) switches the key back
// to untracked reads: the tracking entry it leaves is one per deletion
// made elsewhere, not per request.
func (cs *CacheStore) readEntry(ctx context.Context, ref *entryRef) (*entry, error) {
	if !cs.isKnown(ref) {
		return cs.readPlain(ctx, ref)
	}
	ek := ref.ek
	res := cs.b.DoCache(ctx, ek, ref.get, time.Hour)
	e, err := cs.decodeResult(ek, res)
	if err != nil {
		return nil, err
	}
	if res.IsCacheHit() && cs.staleHere(ek, e) {
		// Our own write or delete has not invalidated the local copy yet.
		return cs.readPlain(ctx, ref)
	}
	switch {
	case e == nil:
		cs.forget(ref.fp)
	case !res.IsCacheHit():
		cs.setKnown(ref, e) // it may have been replaced: its expiry with it
	}
	return e, nil
}

// readPlain reads ref's entry untracked, and marks it for tracked reads
// when it exists.
func (cs *CacheStore) readPlain(ctx context.Context, ref *entryRef) (*entry, error) {
	e, err := cs.decodeResult(ref.ek, cs.b.Do(ctx, ref.ek, rueidis.Completed(ref.get)))
	if err != nil {
		return nil, err
	}
	if e != nil {
		cs.setKnown(ref, e)
	}
	return e, nil
}

// validate checks an entry's tags and age. The tags' counters are read
// through client-side caching (a hit costs nothing): storing the entry
// made them exist, with a TTL at least the entry's, so their tracking
// entries go when they expire.
func (cs *CacheStore) validate(ctx context.Context, e *entry) (lookup, error) {
	if len(e.tags) > 0 {
		gens, err := cs.generations(ctx, tagKeys(e.tags), true)
		if err != nil {
			return lookup{}, err
		}
		for i, t := range e.tags {
			if gens[i] != t.gen {
				return lookup{}, nil // a tag was invalidated since the fill began
			}
		}
	}
	now := cs.b.clock.Now().UnixMilli()
	switch {
	case now < e.fresh:
		return lookup{e: e, fresh: true}, nil
	case now < e.stale:
		return lookup{e: e, stale: true}, nil
	}
	return lookup{}, nil
}

// decodeResult decodes a GET of an entry: nil for none or a corrupt one.
// Decoded entries are remembered by their random id, so a hit on an entry
// this process already decoded costs no copy and no allocation.
func (cs *CacheStore) decodeResult(ek string, res rueidis.RedisResult) (*entry, error) {
	s, err := res.ToString()
	if rueidis.IsRedisNil(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	id, ok := entryID(s)
	if ok {
		if v, found := cs.decoded.Load(ek); found && v.(*entry).id == id {
			return v.(*entry), nil
		}
	}
	e, err := decodeEntry(s)
	if errors.Is(err, errOldEntry) {
		return nil, nil // written before an upgrade: a miss, replaced by the next fill
	}
	if err != nil {
		cs.b.log.Error("redisecho: cache: a corrupt entry is treated as a miss", err, "key", ek)
		return nil, nil
	}
	if cs.decodedN.Add(1) > maxDecoded || cs.decodedBytes.Add(int64(len(s))) > maxDecodedBytes {
		cs.decoded.Clear()
		cs.decodedN.Store(1)
		cs.decodedBytes.Store(int64(len(s)))
	}
	cs.decoded.Store(ek, e)
	return e, nil
}

// maxDecoded bounds the memos of decoded entries and of entry keys; each is
// emptied when full. maxDecodedBytes bounds the decoded entries' size, so
// that many large responses cannot hold much memory besides rueidis's own
// client-side cache.
const (
	maxDecoded      = 1 << 13
	maxDecodedBytes = 64 << 20
)

// entryID reads an encoded entry's id without decoding the rest.
func entryID(s string) (uint64, bool) {
	const off = len(entryMagic) + 1 + 24
	if len(s) < off+8 || s[:3] != entryMagic {
		return 0, false
	}
	var id uint64
	for i := range 8 {
		id = id<<8 | uint64(s[off+i])
	}
	return id, true
}

func tagKeys(tags []tagGen) []string {
	out := make([]string, len(tags))
	for i, t := range tags {
		out[i] = t.tag
	}
	return out
}

// generations returns the current generation of the tag counters keys,
// never below what this instance itself set. tracked reads them through
// client-side caching, for the counters of a stored entry (they exist; one
// that is missing gives -2, which no entry recorded); otherwise (a fill's
// tags, from the request: the counter of a junk ID may never be written)
// they are read untracked, and a missing one gives 0, "absent".
func (cs *CacheStore) generations(ctx context.Context, keys []string, tracked bool) ([]int64, error) {
	var res []rueidis.RedisResult
	if tracked {
		cmds := make([]rueidis.CacheableTTL, len(keys))
		for i, k := range keys {
			cmds[i] = rueidis.CT(cs.b.client.B().Get().Key(k).Cache(), time.Hour)
		}
		res = cs.b.DoMultiCache(ctx, keys[0], cmds...)
	} else {
		// The keys may live on several nodes; rueidis routes each GET to
		// its own. The breaker scope is the first key's node.
		cmds := make([]rueidis.Completed, len(keys))
		for i, k := range keys {
			cmds[i] = cs.b.client.B().Get().Key(k).Build()
		}
		res = cs.b.DoMulti(ctx, keys[0], cmds...)
	}
	gens := make([]int64, len(keys))
	now := time.Now().UnixNano()
	for i, r := range res {
		if err := r.Error(); err != nil && !rueidis.IsRedisNil(err) {
			return nil, err
		}
		n, err := r.AsInt64()
		switch {
		case rueidis.IsRedisNil(err) && tracked:
			n = -2 // validating: a missing counter (evicted?) matches no entry
		case rueidis.IsRedisNil(err):
			n = 0 // a fill: absent, see write
		case err != nil:
			n = -1 // not a counter (someone wrote to it): matches no entry
		}
		if v, ok := cs.tagFloor.Load(keys[i]); ok {
			if f := v.(tagFloor); now-f.at < int64(cs.cfg.RecentWindow) {
				n = max(n, f.gen)
			} else {
				cs.tagFloor.CompareAndDelete(keys[i], v)
			}
		}
		gens[i] = n
	}
	return gens, nil
}

// tagFloor is the generation this instance's own INCR returned, trusted over
// the local cache until the invalidation has surely arrived.
type tagFloor struct {
	gen int64
	at  int64 // unix nanos
}

// bumpScript moves a tag to its next generation and keeps its counter
// TagTTL. A missing counter starts from a random generation (see
// newGeneration), never from 0. Its first write is SET or INCR, which Redis
// refuses when it is out of memory (deny-OOM commands): then nothing is
// written.
//
// KEYS[1] the tag counter; ARGV[1] TagTTL (ms); ARGV[2] the random
// generation to start from. Returns the new generation.
var bumpScript = rueidis.NewLuaScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[2])
end
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
`)

// newGeneration returns the random generation a new tag counter starts
// from: in [1, 2^52), so that INCR results stay exact through Lua's
// numbers, and a counter created again after an eviction does not come
// back to a generation an old entry recorded (2^-52 a chance).
func newGeneration() string { return strconv.FormatUint(mrand.Uint64N(1<<52-1)+1, 10) }

// InvalidateTags makes every entry tagged with any of tags a miss, on every
// instance: one INCR per tag, whatever the number of entries. This instance
// stops serving them at once; others when Redis's invalidation reaches
// them. When Redis is out of memory it returns an error wrapping
// ErrCacheOutOfMemory, and the tags from the failing one on are not
// invalidated: their entries are served until they expire, so report it
// (or retry).
func (cs *CacheStore) InvalidateTags(ctx context.Context, tags ...string) error {
	for _, t := range tags {
		if t == "" {
			return ErrInvalidCacheKey
		}
	}
	for i, t := range tags {
		k := cs.tagKey(t)
		n, err := cs.b.Exec(ctx, bumpScript, []string{k}, []string{strconv.FormatInt(cs.cfg.TagTTL.Milliseconds(), 10), newGeneration()}).AsInt64()
		if err != nil {
			cs.observeInvalidation(int64(i)) // the tags before this one
			return fmt.Errorf("redisecho: cache: invalidate tag %q: %w", t, oomError(err))
		}
		cs.epoch.Add(1)
		for fl := (tagFloor{gen: n, at: time.Now().UnixNano()}); ; {
			old, loaded := cs.tagFloor.LoadOrStore(k, fl)
			if !loaded || old.(tagFloor).gen >= n || cs.tagFloor.CompareAndSwap(k, old, fl) {
				break
			}
		}
		cs.sweep()
	}
	cs.observeInvalidation(int64(len(tags)))
	return nil
}

// observeInvalidation reports n invalidated things (entries removed, tags
// moved on), when there are any.
func (cs *CacheStore) observeInvalidation(n int64) {
	if n > 0 {
		cs.b.observe(Observation{Kind: ObsCacheInvalidation, N: n})
	}
}

// Delete removes the entries of keys. This instance stops serving them at
// once; others when Redis's invalidation reaches them.
func (cs *CacheStore) Delete(ctx context.Context, keys ...string) error {
	var removed int64 // entries that existed, for ObsCacheInvalidation
	for _, key := range keys {
		// Deleting the fill lock too makes a fill in flight store nothing:
		// its value may predate the delete.
		ek, lk := cs.entryKey(key), cs.lockKey(key)
		cs.epoch.Add(1)
		for i, r := range cs.b.DoMulti(ctx, ek, cs.b.client.B().Del().Key(ek).Build(), cs.b.client.B().Del().Key(lk).Build()) {
			if err := r.Error(); err != nil {
				cs.observeInvalidation(removed)
				return fmt.Errorf("redisecho: cache: delete %q: %w", key, err)
			}
			if i == 0 && cs.b.obs != nil {
				n, _ := r.AsInt64()
				removed += n
			}
		}
		cs.markDelete(ek)
		cs.forget(cs.entry(key).fp) // read untracked until it exists again
	}
	cs.observeInvalidation(removed)
	return nil
}

// Flush deletes every entry whose key matches pattern, a Redis glob over
// cache keys (for example "user:*" or "GET /api/products*"), with SCAN on
// every master. It returns how many entries it deleted. It never uses KEYS
// or FLUSHDB. A cache key longer than MaxKeyPart (256 bytes, escaped) is
// stored as its first KeptPartHead (64) escaped bytes, "%~" and a digest:
// a pattern matches such a key only through its head, so keep the literal
// text before a pattern's first '*' within 64 bytes (escaped: '%', ':',
// '{' and '}' count 3). It works in a full Redis (DEL is always allowed).
func (cs *CacheStore) Flush(ctx context.Context, pattern string) (int, error) {
	var b strings.Builder
	b.WriteString(matchPattern(cs.b.keys.Prefix())[:len(matchPattern(cs.b.keys.Prefix()))-1])
	b.WriteString(`\{c:`)
	writeEscaped(&b, pattern) // escaped, never digested: the pattern is the app's, and globs must survive
	b.WriteString(`\}:[el]`)  // entries, and fill locks so fills in flight store nothing
	cs.epoch.Add(1)
	n := 0
	err := scanMasters(ctx, cs.b.client, b.String(), func(ctx context.Context, _ rueidis.Client, keys []string) error {
		for _, k := range keys {
			if err := cs.b.Do(ctx, k, cs.b.client.B().Del().Key(k).Build()).Error(); err != nil {
				return err
			}
			if strings.HasSuffix(k, ":e") {
				cs.forget(knownFP(k)) // read untracked until it exists again
				cs.markDelete(k)      // this instance stops serving it at once
				n++
			}
		}
		return nil
	})
	cs.observeInvalidation(int64(n))
	return n, err
}

// storeScript writes an entry and releases the fill lock, but only if this
// filler still holds the lock: a Delete or Flush during the fill removed
// it, and the value may predate them. A write without a lock (Set) always
// lands, and removes the lock, so that a fill that began before it cannot
// overwrite it. It returns 1 when it stored, 0 when it did not. Its first
// write is SET, which Redis refuses when it is out of memory (a deny-OOM
// command; a script whose first write is not one goes on writing into a
// full Redis): then nothing is written, and the caller releases its lock.
//
// KEYS[1] the entry; KEYS[2] its fill lock (same slot).
// ARGV[1] the encoded entry; ARGV[2] its TTL (ms); ARGV[3] the filler's
// lock token ("" when it held no lock).
var storeScript = rueidis.NewLuaScript(`
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
`)

// unlockScript releases a fill lock if the caller still holds it. Its only
// write is DEL, which a full Redis allows, so no lock is left behind.
//
// KEYS[1] the lock; ARGV[1] the holder's token.
var unlockScript = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`)

// ensureTagScript makes a tag counter live at least as long as an entry
// about to be stored with it: it creates the counter at a random
// generation, or extends its TTL, never shortens it. So every counter an
// entry names exists while the entry does, and the tracked reads that
// validate the entry's hits never leave tracking state behind for a
// counter that is never written. Its first write is SET (deny-OOM: refused
// in a full Redis, nothing written) or, for a counter that exists,
// PEXPIRE, which allocates nothing.
//
// KEYS[1] the tag counter; ARGV[1] the TTL it needs (ms); ARGV[2] the
// generation to create it at (newGeneration). Returns 1 when it created
// the counter, 0 when it existed.
var ensureTagScript = rueidis.NewLuaScript(`
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
  return 1
elseif ttl >= 0 and ttl < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
`)

// tagCounterMargin is how much longer than an entry its tag counters are
// made to live, for the round trip between the two writes and clock skew
// between the nodes that hold them.
const tagCounterMargin = 5 * time.Second

// oomError wraps a Redis OOM reply with ErrCacheOutOfMemory.
func oomError(err error) error {
	if isOOM(err) {
		return fmt.Errorf("%w: %w", ErrCacheOutOfMemory, err)
	}
	return err
}

// write stores e under key, releasing the fill lock token if not "". It
// writes nothing while key's node is out of memory (ErrCacheOutOfMemory):
// first its tag counters (so that none is missing while the entry lives),
// then the entry; when a counter fails the entry is not stored. A tag whose
// counter was absent when the fill began (generation 0) gets the
// generation its counter is created at, when this write creates it; when
// another writer created it meanwhile (an invalidation, say), the entry
// could never be valid and is not stored. A caller holding the lock
// releases it when write fails; write releases it when it stores nothing
// otherwise. A stored entry is an ObsCacheFill whose Duration runs from
// start (set only when there is an observer).
func (cs *CacheStore) write(ctx context.Context, key string, e *entry, lockToken string, start time.Time) error {
	if len(e.tags) > 0 {
		// A tagged entry must not outlive its tags' counters (see TagTTL).
		limit := e.stored + cs.cfg.TagTTL.Milliseconds()
		e.stale = min(e.stale, limit)
		e.fresh = min(e.fresh, limit)
	}
	ttl := time.Duration(e.stale-cs.b.clock.Now().UnixMilli()) * time.Millisecond
	if ttl <= 0 {
		cs.unlock(ctx, key, lockToken)
		return nil
	}
	ref := cs.entry(key)
	ek, lk := ref.ek, cs.lockKey(key)
	if cs.b.OOM(ek) {
		return ErrCacheOutOfMemory
	}
	need := strconv.FormatInt((ttl + tagCounterMargin).Milliseconds(), 10)
	for i, t := range e.tags {
		gen := newGeneration()
		created, err := cs.b.Exec(ctx, ensureTagScript, []string{t.tag}, []string{need, gen}).AsInt64()
		if err != nil {
			return oomError(err)
		}
		switch {
		case t.gen != 0:
		case created == 1:
			e.tags[i].gen, _ = strconv.ParseInt(gen, 10, 64)
		default:
			cs.unlock(ctx, key, lockToken)
			return nil // absent when the fill began, written by another since
		}
	}
	enc := e.encode()
	stored, err := cs.b.Exec(ctx, storeScript, []string{ek, lk}, []string{string(enc), strconv.FormatInt(ttl.Milliseconds(), 10), lockToken}).AsInt64()
	if err != nil {
		return oomError(err)
	}
	if stored == 1 {
		cs.fills.Add(1)
		cs.markWrite(ek, e.id)
		cs.setKnown(ref, e)
		if cs.b.obs != nil { // once this instance reads what it stored
			cs.b.obs.Observe(Observation{Kind: ObsCacheFill, N: 1, Size: int64(len(enc)), Duration: time.Since(start)})
		}
	}
	return nil
}

// tryLock takes key's fill lock for LockTTL, returning its token, or "" if
// another filler holds it.
func (cs *CacheStore) tryLock(ctx context.Context, key string) (string, error) {
	var b [16]byte
	_, _ = rand.Read(b[:])
	tok := base64.RawURLEncoding.EncodeToString(b[:])
	lk := cs.lockKey(key)
	err := cs.b.Do(ctx, lk, cs.b.client.B().Set().Key(lk).Value(tok).Nx().PxMilliseconds(cs.cfg.LockTTL.Milliseconds()).Build()).Error()
	if rueidis.IsRedisNil(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return tok, nil
}

func (cs *CacheStore) unlock(ctx context.Context, key, tok string) {
	if tok == "" {
		return
	}
	lk := cs.lockKey(key)
	if err := cs.b.Exec(ctx, unlockScript, []string{lk}, []string{tok}).Error(); err != nil {
		cs.b.log.Error("redisecho: cache: releasing a fill lock failed; it expires by itself", err)
	}
}

// recentMark records that this instance wrote (id != 0) or deleted (id ==
// 0) an entry, until Redis's invalidation has surely reached the local
// cache.
type recentMark struct {
	id uint64 // the entry we wrote; 0 for a delete
	ms int64  // the delete's time (unix ms)
	at int64  // unix nanos of the mark, for expiry after RecentWindow
}

func (cs *CacheStore) markWrite(ek string, id uint64) {
	cs.recent.Store(ek, recentMark{id: id, at: time.Now().UnixNano()})
	cs.sweep()
}

func (cs *CacheStore) markDelete(ek string) {
	cs.recent.Store(ek, recentMark{ms: cs.b.clock.Now().UnixMilli(), at: time.Now().UnixNano()})
	cs.sweep()
}

// sweep drops expired marks and tag floors every 1024 marks, so they stay
// bounded by what this instance changed within RecentWindow.
func (cs *CacheStore) sweep() {
	if cs.marks.Add(1)%1024 != 0 {
		return
	}
	cutoff := time.Now().UnixNano() - int64(cs.cfg.RecentWindow)
	cs.recent.Range(func(k, v any) bool {
		if v.(recentMark).at < cutoff {
			cs.recent.CompareAndDelete(k, v)
		}
		return true
	})
	cs.tagFloor.Range(func(k, v any) bool {
		if v.(tagFloor).at < cutoff {
			cs.tagFloor.CompareAndDelete(k, v)
		}
		return true
	})
}

// staleHere reports whether a locally cached copy (e, or nil for a cached
// miss) of ek predates a write, delete or flush of this instance whose
// invalidation may not have arrived yet. When unsure it says stale: that
// costs one uncached read.
func (cs *CacheStore) staleHere(ek string, e *entry) bool {
	now := time.Now().UnixNano()
	window := int64(cs.cfg.RecentWindow)
	v, ok := cs.recent.Load(ek)
	if !ok {
		return false
	}
	m := v.(recentMark)
	if now-m.at >= window {
		cs.recent.CompareAndDelete(ek, v)
		return false
	}
	if m.id != 0 {
		return e == nil || e.id != m.id
	}
	return e != nil // after our delete: verify any copy (clocks may differ)
}

// cacheFill is one in-process fill that other requests for the same key
// wait for.
type cacheFill struct {
	done  chan struct{}
	once  sync.Once
	epoch int64 // the local invalidation epoch when the fill began
	e     *entry
	err   error
}

// finish publishes the fill's outcome to its waiters, once.
func (f *cacheFill) finish(e *entry, err error) {
	f.once.Do(func() { f.e, f.err = e, err; close(f.done) })
}

// fillFunc computes an entry (nil: do not store, e.g. an uncacheable
// response).
type fillFunc func(ctx context.Context) (*entry, error)

// releaseKey is the context key of a fill's release function: a fill that
// turns out not to be cacheable (a streamed response) calls it to let the
// requests waiting for it go on at once.
type releaseKey struct{}

func releaseFrom(ctx context.Context) func() {
	if f, ok := ctx.Value(releaseKey{}).(func()); ok {
		return f
	}
	return func() {}
}

// get returns key's entry, computing it with fill on a miss, so that one
// fill runs for the whole cluster while the others wait:
//
//   - in this process, concurrent misses share one fill (for at most
//     LockTTL; a fill that began before this instance's last invalidation is
//     not joined);
//   - across instances, the fill lock (SET NX PX) lets one instance fill;
//     the others poll the entry and the lock through client-side caching
//     (free until an invalidation arrives) and fill themselves once the lock
//     is gone without an entry, or after LockTTL, rather than fail;
//   - the lock holder re-reads the entry from Redis before it fills, so a
//     fill that finished just before it took the lock is not repeated.
//
// tags are read before the fill starts, so an invalidation during the fill
// wins. refill builds the fill of a background refresh (called while the
// request is still running, only for a stale hit). When Redis fails, fill
// runs uncached and its entry is returned.
func (cs *CacheStore) get(ctx context.Context, key string, tags []string, fill fillFunc, refill func() fillFunc) (lookup, error) {
	l, err := cs.read(ctx, key)
	if err != nil {
		e, ferr := cs.fillUncached(ctx, fill, err)
		return lookup{e: e, fresh: true, res: ResultBypass}, ferr
	}
	if l.fresh || l.stale {
		cs.hits.Add(1)
		l.res = ResultHit
		if l.stale {
			l.res = ResultStale
			cs.refreshInBackground(key, tags, refill())
		}
		return l, nil
	}
	cs.misses.Add(1)
	own := func(f *cacheFill) (l lookup, err error) {
		var e *entry
		defer func() { // also when fill panics: never leave waiters hanging
			f.finish(e, err)
			cs.flight.CompareAndDelete(key, f)
		}()
		var res Result
		e, res, err = cs.fillOnce(ctx, key, tags, fill, f)
		return lookup{e: e, fresh: true, res: res}, err
	}
	for {
		f := &cacheFill{done: make(chan struct{}), epoch: cs.epoch.Load()}
		other, loaded := cs.flight.LoadOrStore(key, f)
		if loaded {
			of := other.(*cacheFill)
			if of.epoch < cs.epoch.Load() {
				// It began before an invalidation here: don't join it; take
				// its place (it ends on its own, and stores nothing usable).
				if !cs.flight.CompareAndSwap(key, of, f) {
					continue
				}
				return own(f)
			}
			cs.waits.Add(1)
			cs.b.observe(Observation{Kind: ObsCacheWait, N: 1})
			select {
			case <-of.done:
				if of.err != nil && (errors.Is(of.err, context.Canceled) || errors.Is(of.err, context.DeadlineExceeded)) && ctx.Err() == nil {
					continue // its client gave up, not ours: take over
				}
				res := ResultMiss
				if of.e == nil && of.err == nil {
					// The fill found its response not storable: the caller
					// computes its own, uncached.
					res = ResultUncacheable
				}
				return lookup{e: of.e, fresh: true, res: res}, of.err
			case <-ctx.Done():
				return lookup{res: ResultMiss}, ctx.Err()
			case <-time.After(2 * cs.cfg.LockTTL):
				// The leader may wait LockTTL for another instance before it
				// computes; beyond twice that, compute uncached.
				return lookup{res: ResultMiss}, nil
			}
		}
		return own(f)
	}
}

// fillOnce runs the cross-instance part of get for the in-process fill f.
// Its Result is the request's, for ObsCacheRequest (see lookup.res).
func (cs *CacheStore) fillOnce(ctx context.Context, key string, tags []string, fill fillFunc, f *cacheFill) (*entry, Result, error) {
	if cs.b.OOM(cs.entryKey(key)) {
		// Redis is full: no lock (SET would be refused), nothing stored.
		// The handler runs and answers as usual; in-process waiters share
		// its result.
		cs.b.log.Error("redisecho: cache: Redis is out of memory; computing without storing", ErrCacheOutOfMemory)
		e, err := fill(ctx)
		if e == nil || err != nil {
			return e, ResultUncacheable, err
		}
		return e, ResultMiss, nil
	}
	gens, err := cs.tagGens(ctx, tags)
	if err != nil {
		return cs.bypass(ctx, fill, err)
	}
	deadline := time.Now().Add(cs.cfg.LockTTL)
	var tok string
	for waited := false; ; waited = true {
		if tok, err = cs.tryLock(ctx, key); err != nil {
			return cs.bypass(ctx, fill, err)
		}
		if tok != "" {
			// Ours now. A fill that ended just before may have stored the
			// entry: look in Redis itself before computing it again.
			if l, err := cs.readFromRedis(ctx, key); err == nil && (l.fresh || l.stale) {
				cs.unlock(context.WithoutCancel(ctx), key, tok)
				return l.e, ResultMiss, nil
			}
			break
		}
		if waited {
			// The lock went, and another waiter took it first: the fill we
			// waited for may have stored the entry.
			if l, err := cs.readFromRedis(ctx, key); err == nil && (l.fresh || l.stale) {
				return l.e, ResultMiss, nil
			}
		}
		// Another instance fills: wait for its lock to go (its store
		// releases it atomically with the write, or it found its response
		// not storable), then take the lock, which re-reads the entry from
		// Redis above. The lock is read through the local cache, so waiting
		// costs Redis nothing until it changes. That tracked read leaves no
		// tracking state behind: it saw the lock held (its release removes
		// the tracking entry), or it saw it free and the SET NX that follows
		// writes it (ours), or failed because someone else wrote it since.
		// (The entry itself is not polled: a tracked read of the entry of a
		// response that is never stored would stay in Redis's tracking
		// table.)
		cs.waits.Add(1)
		cs.b.observe(Observation{Kind: ObsCacheWait, N: 1})
		lk := cs.lockKey(key)
		for time.Now().Before(deadline) {
			select {
			case <-ctx.Done():
				return nil, ResultMiss, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
			err := cs.b.DoCache(ctx, lk, cs.b.client.B().Get().Key(lk).Cache().Pin(), cs.cfg.LockTTL).Error()
			if rueidis.IsRedisNil(err) {
				break // the lock is free: try to take it
			}
			if err != nil {
				return cs.bypass(ctx, fill, err)
			}
		}
		if !time.Now().Before(deadline) {
			break // too slow or gone: compute it ourselves, without the lock
		}
	}

	released := false
	release := func() {
		if !released {
			released = true
			f.finish(nil, nil)
			cs.flight.CompareAndDelete(key, f)
			cs.unlock(context.WithoutCancel(ctx), key, tok)
		}
	}
	// A fill that holds the lock (and so may store) is a span, from the
	// computation to the store; the computation runs under it.
	var start time.Time
	if cs.b.obs != nil {
		start = time.Now()
	}
	fctx, end := ctx, noEnd
	if tok != "" {
		fctx, end = cs.b.startSpan(ctx, Span{Op: SpanCacheFill, Name: cs.b.keys.Prefix()})
	}
	var spanErr error
	defer func() {
		if p := recover(); p != nil {
			end(errFillPanicked)
			release() // don't make others wait for a dead fill
			panic(p)
		}
		end(spanErr)
	}()
	e, err := fill(context.WithValue(fctx, releaseKey{}, release))
	spanErr = err
	switch {
	case released:
		return e, ResultUncacheable, err // streamed, or hijacked
	case err != nil:
		// Waiters get the error too (no second call into a failing
		// backend); the lock goes so others may retry.
		cs.unlock(context.WithoutCancel(ctx), key, tok)
		return nil, ResultUncacheable, err
	case e == nil:
		release() // not storable: waiters compute their own
		return nil, ResultUncacheable, nil
	case tok == "":
		// Computed without the lock (the holder was too slow): a Delete or
		// Flush may have happened meanwhile, so store nothing.
		return e, ResultMiss, nil
	}
	e.tags = append(e.tags[:0], gens...)
	if werr := cs.write(context.WithoutCancel(fctx), key, e, tok, start); werr != nil {
		spanErr = werr
		cs.errors.Add(1)
		cs.b.log.Error("redisecho: cache: storing an entry failed", werr)
		cs.unlock(context.WithoutCancel(ctx), key, tok) // DEL works in a full Redis too
	}
	return e, ResultMiss, nil
}

// errFillPanicked ends the span of a fill that panicked.
var errFillPanicked = errors.New("redisecho: cache: the fill panicked")

// bypass is fillUncached for fillOnce: the request's result is
// ResultBypass.
func (cs *CacheStore) bypass(ctx context.Context, fill fillFunc, cause error) (*entry, Result, error) {
	e, err := cs.fillUncached(ctx, fill, cause)
	return e, ResultBypass, err
}

// readFromRedis is read without the local cache.
func (cs *CacheStore) readFromRedis(ctx context.Context, key string) (lookup, error) {
	e, err := cs.readPlain(ctx, cs.entry(key))
	if err != nil || e == nil {
		return lookup{}, err
	}
	return cs.validate(ctx, e)
}

// tagGens returns the counter keys and current generations of a fill's
// tags, read untracked: they come from the request, and the counter of a
// junk ID may never be written.
func (cs *CacheStore) tagGens(ctx context.Context, tags []string) ([]tagGen, error) {
	if len(tags) == 0 {
		return nil, nil
	}
	keys := make([]string, len(tags))
	for i, t := range tags {
		keys[i] = cs.tagKey(t)
	}
	gens, err := cs.generations(ctx, keys, false)
	if err != nil {
		return nil, err
	}
	out := make([]tagGen, len(tags))
	for i := range tags {
		out[i] = tagGen{tag: keys[i], gen: gens[i]}
	}
	return out, nil
}

func (cs *CacheStore) fillUncached(ctx context.Context, fill fillFunc, cause error) (*entry, error) {
	cs.errors.Add(1)
	cs.b.log.Error("redisecho: cache: Redis failed; computing uncached", cause)
	return fill(ctx)
}

// refreshInBackground recomputes a stale entry once for the whole cluster
// (the instance that takes the fill lock), off the request. A panic or an
// error in the refresh is logged, never fatal.
func (cs *CacheStore) refreshInBackground(key string, tags []string, fill fillFunc) {
	f := &cacheFill{done: make(chan struct{}), epoch: cs.epoch.Load()}
	if _, loaded := cs.flight.LoadOrStore(key, f); loaded {
		return // a refresh or a fill is already under way here
	}
	go func() {
		defer func() {
			if p := recover(); p != nil {
				cs.b.log.Error("redisecho: cache: background refresh panicked", fmt.Errorf("%v", p), "key", key)
			}
			f.finish(nil, nil)
			cs.flight.CompareAndDelete(key, f)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), cs.cfg.LockTTL)
		defer cancel()
		gens, err := cs.tagGens(ctx, tags)
		if err != nil {
			return
		}
		tok, err := cs.tryLock(ctx, key)
		if err != nil || tok == "" {
			return // another instance refreshes it
		}
		defer cs.unlock(ctx, key, tok) // a no-op once the store released it
		var start time.Time
		if cs.b.obs != nil {
			start = time.Now()
		}
		fctx, end := cs.b.startSpan(ctx, Span{Op: SpanCacheFill, Name: cs.b.keys.Prefix()})
		spanErr := errFillPanicked
		defer func() { end(spanErr) }()
		e, err := fill(fctx)
		spanErr = err
		if err != nil || e == nil {
			if err != nil {
				cs.b.log.Error("redisecho: cache: background refresh failed; the stale entry stays", err, "key", key)
			}
			return
		}
		e.tags = append(e.tags[:0], gens...)
		if err := cs.write(fctx, key, e, tok, start); err != nil {
			spanErr = err
			cs.b.log.Error("redisecho: cache: storing a refreshed entry failed", err)
		}
		f.finish(e, nil) // requests that joined the refresh get its entry
	}()
}

// Get decodes the value stored under key into dst with the codec, and
// reports whether there was one. A Redis failure is returned as an error;
// callers that can live without the cache treat it as a miss.
func (cs *CacheStore) Get(ctx context.Context, key string, dst any) (bool, error) {
	if key == "" {
		return false, ErrInvalidCacheKey
	}
	l, err := cs.read(ctx, key)
	if err != nil {
		cs.b.observe(Observation{Kind: ObsCacheRequest, Result: ResultBypass, N: 1})
		return false, err
	}
	if l.e == nil || l.e.notFound {
		cs.misses.Add(1)
		cs.b.observe(Observation{Kind: ObsCacheRequest, Result: ResultMiss, N: 1})
		return false, nil
	}
	cs.hits.Add(1)
	res := ResultHit
	if l.stale {
		res = ResultStale // served past its freshness (Get refreshes nothing)
	}
	cs.b.observe(Observation{Kind: ObsCacheRequest, Result: res, N: 1})
	if err := cs.cfg.Codec.Unmarshal(l.e.body, dst); err != nil {
		return false, fmt.Errorf("redisecho: cache: decode %q: %w", key, err)
	}
	return true, nil
}

// Set stores value under key for ttl (DefaultCacheTTL when 0), tagged with
// tags. A value the codec cannot encode is an error and stores nothing; so
// is a full Redis (ErrCacheOutOfMemory, wrapped). The
// tags' generations are read when Set runs: an invalidation that happened
// while the caller computed value is not seen, so prefer Remember, which
// reads them before it computes.
func (cs *CacheStore) Set(ctx context.Context, key string, value any, ttl time.Duration, tags ...string) error {
	if err := checkCacheNames(key, tags); err != nil {
		return err
	}
	// A Set is a fill (CacheStats.Fills): a span, an ObsCacheFill when
	// stored.
	var start time.Time
	if cs.b.obs != nil {
		start = time.Now()
	}
	ctx, end := cs.b.startSpan(ctx, Span{Op: SpanCacheFill, Name: cs.b.keys.Prefix()})
	err := cs.set(ctx, key, value, ttl, tags, start)
	end(err)
	return err
}

func (cs *CacheStore) set(ctx context.Context, key string, value any, ttl time.Duration, tags []string, start time.Time) error {
	body, err := cs.cfg.Codec.Marshal(value)
	if err != nil {
		return fmt.Errorf("redisecho: cache: encode %q: %w", key, err)
	}
	gens, err := cs.tagGens(ctx, tags)
	if err != nil {
		return err
	}
	e := cs.newEntry(ttl, 0)
	e.body = body
	e.tags = gens
	return cs.write(ctx, key, e, "", start)
}

func checkCacheNames(key string, tags []string) error {
	if key == "" || slices.Contains(tags, "") {
		return ErrInvalidCacheKey
	}
	return nil
}

// newEntry returns an entry fresh for ttl and then servable stale for
// stale more.
func (cs *CacheStore) newEntry(ttl, stale time.Duration) *entry {
	if ttl <= 0 {
		ttl = DefaultCacheTTL
	}
	now := cs.b.clock.Now().UnixMilli()
	fresh := now + ttl.Milliseconds()
	var id [8]byte
	_, _ = rand.Read(id[:])
	return &entry{stored: now, fresh: fresh, stale: fresh + stale.Milliseconds(), id: binary.BigEndian.Uint64(id[:]) | 1}
}

// RememberOption tunes Remember.
type RememberOption func(*rememberOptions)

type rememberOptions struct {
	tags     []string
	notFound time.Duration
	stale    time.Duration
	retried  bool // a replaced undecodable value: no second replacement
}

// WithTags tags the remembered value, for InvalidateTags.
func WithTags(tags ...string) RememberOption {
	return func(o *rememberOptions) { o.tags = append(o.tags, tags...) }
}

// CacheNotFound caches an ErrCacheNotFound from the function for ttl, so
// lookups of missing things do not reach the backing store every time.
// Default: not cached.
func CacheNotFound(ttl time.Duration) RememberOption {
	return func(o *rememberOptions) { o.notFound = ttl }
}

// StaleWhileRevalidate serves the value for grace more after it went stale,
// while one refresh for the whole cluster recomputes it in the background.
// Default: 0 (a stale value is a miss).
func StaleWhileRevalidate(grace time.Duration) RememberOption {
	return func(o *rememberOptions) { o.stale = grace }
}

// Remember returns the value cached under key, or computes it with fn,
// caches it for ttl (DefaultCacheTTL when 0) and returns it. Concurrent
// misses, here and on other instances, run fn once (see the package's
// stampede protection); when Redis fails, fn runs uncached and its result is
// returned. fn's errors are returned and not cached, except ErrCacheNotFound
// with CacheNotFound.
func Remember[T any](ctx context.Context, cs *CacheStore, key string, ttl time.Duration, fn func(ctx context.Context) (T, error), opts ...RememberOption) (T, error) {
	var zero T
	var o rememberOptions
	for _, opt := range opts {
		opt(&o)
	}
	if err := checkCacheNames(key, o.tags); err != nil {
		return zero, err
	}
	// encode turns fn's result into an entry; notFound reports a cached
	// ErrCacheNotFound.
	encode := func(v T, err error) (e *entry, notFound bool, _ error) {
		if errors.Is(err, ErrCacheNotFound) && o.notFound > 0 {
			e = cs.newEntry(o.notFound, 0)
			e.notFound = true
			return e, true, nil
		}
		if err != nil {
			return nil, false, err
		}
		body, err := cs.cfg.Codec.Marshal(v)
		if err != nil {
			return nil, false, fmt.Errorf("redisecho: cache: encode %q: %w", key, err)
		}
		e = cs.newEntry(ttl, o.stale)
		e.body = body
		return e, false, nil
	}
	var (
		computed   *T
		computeErr error
	)
	fill := func(ctx context.Context) (*entry, error) {
		v, err := fn(ctx)
		e, notFound, err := encode(v, err)
		if err == nil {
			if notFound {
				computeErr = ErrCacheNotFound
			} else {
				computed = &v
			}
		}
		return e, err
	}
	refill := func(ctx context.Context) (*entry, error) { // runs after Remember returned
		e, _, err := encode(fn(ctx))
		return e, err
	}
	l, err := cs.get(ctx, key, o.tags, fill, func() fillFunc { return refill })
	if computed != nil {
		cs.observeRequest(l.res)
		return *computed, err
	}
	if computeErr != nil {
		cs.observeRequest(l.res)
		return zero, fmt.Errorf("%w: %s", computeErr, key)
	}
	if err != nil {
		cs.observeRequest(l.res)
		return zero, err
	}
	if l.e == nil {
		cs.observeRequest(l.res)
		return fn(ctx) // the shared fill produced nothing to reuse
	}
	if l.e.notFound {
		cs.observeRequest(l.res)
		return zero, fmt.Errorf("%w: %s", ErrCacheNotFound, key)
	}
	var v T
	if err := cs.cfg.Codec.Unmarshal(l.e.body, &v); err != nil {
		// A value this type cannot decode (stored by older code, say) is a
		// miss: compute afresh and replace it. (The call that replaces it
		// reports the request.)
		cs.b.log.Error("redisecho: cache: a stored value does not decode; recomputing", err, "key", key)
		if derr := cs.Delete(ctx, key); derr != nil || o.retried {
			cs.observeRequest(ResultMiss)
			return fn(ctx) // once is enough: another writer may keep storing the other type
		}
		return Remember(ctx, cs, key, ttl, fn, append(opts, func(o *rememberOptions) { o.retried = true })...)
	}
	cs.observeRequest(l.res)
	return v, nil
}

// observeRequest reports a read of the cache that get answered with res.
func (cs *CacheStore) observeRequest(res Result) {
	cs.b.observe(Observation{Kind: ObsCacheRequest, Result: res, N: 1})
}

// CacheConfig configures the response cache middleware.
type CacheConfig struct {
	// Store is the cache store to use. Default: a store built from Client
	// and Options (every store on one client and prefix shares its
	// in-process state, so invalidations through any of them are seen at
	// once).
	Store *CacheStore
	// Client is the rueidis client; required when Store is nil.
	Client rueidis.Client
	// Options is the shared plumbing, used when Store is nil.
	Options
	// Skipper skips the middleware for a request. Default: never skip.
	Skipper middleware.Skipper
	// TTL is how long a response stays fresh. Default: 5 min.
	TTL time.Duration
	// StaleWhileRevalidate serves a response for this long after it went
	// stale, while one refresh for the whole cluster recomputes it in the
	// background. Default: 0 (off).
	StaleWhileRevalidate time.Duration
	// NotFoundTTL caches 404 responses for this long (negative caching).
	// Default: 0 (404s are not cached).
	NotFoundTTL time.Duration
	// Statuses lists the cacheable statuses; 5xx is refused. Default: [200].
	Statuses []int
	// KeyFunc returns the cache key of a request, or "" to bypass the
	// cache. Parts come from users, so keys go through the library's key
	// escaping. Default: DefaultCacheKey with Vary.
	KeyFunc func(c echo.Context) string
	// Vary lists the request headers that select a variant: their values
	// are part of the default key. A response whose Vary header names
	// another header (or "*") is not stored. Default: Accept,
	// Accept-Encoding, Accept-Language.
	Vary []string
	// Tags returns the tags of a request's response, evaluated before the
	// handler runs, so an invalidation during the handler wins. Default:
	// none.
	Tags func(c echo.Context) []string
	// AllowHeaders lists response headers stored and replayed besides
	// Content-Type, Content-Encoding, Content-Language, ETag,
	// Last-Modified and Cache-Control. Default: none.
	AllowHeaders []string
	// MaxBodySize bounds the body of a stored response, in bytes; larger
	// responses are served but not stored. Default: 1 MiB.
	MaxBodySize int
	// SessionCookie is the session cookie's name: requests that carry it
	// (or an Authorization header) bypass the cache, unless Personal is
	// set. Default: "sessionId".
	SessionCookie string
	// Personal caches requests with credentials too. Set it only with a
	// KeyFunc that includes the requesting user, like the guide's
	// "user:<id>" where the ID is the caller's: responses marked private or
	// Vary: Cookie (the session middleware's marks) are stored too, under
	// that key, and replayed with their marks. Default: false.
	Personal bool
}

// Cache returns the response cache middleware for client, caching GET and
// HEAD responses for ttl (DefaultCacheTTL when 0) with the defaults of
// CacheConfig. It panics when client is nil.
func Cache(client rueidis.Client, ttl time.Duration) echo.MiddlewareFunc {
	return CacheWithConfig(CacheConfig{Client: client, TTL: ttl})
}

// CacheWithConfig returns the response cache middleware for cfg. It panics
// when cfg is invalid; use ToMiddleware to get the error instead.
func CacheWithConfig(cfg CacheConfig) echo.MiddlewareFunc {
	return must(cfg.ToMiddleware())
}

// cacheContextKey is the echo.Context key of the route's *CacheStore.
const cacheContextKey = "redisecho.cache"

// GetCache returns the cache store of the Cache middleware that handles the
// request, for the cache service helpers (Get, Set, Remember,
// InvalidateTags…). It returns ErrNoCacheMiddleware when none ran.
func GetCache(c echo.Context) (*CacheStore, error) {
	if cs, ok := c.Get(cacheContextKey).(*CacheStore); ok {
		return cs, nil
	}
	return nil, ErrNoCacheMiddleware
}

// DefaultCacheKey returns the default key of a request: its method, path,
// query with the parameters sorted, and the values of the vary headers.
func DefaultCacheKey(c echo.Context, vary []string) string {
	r := c.Request()
	var b strings.Builder
	b.WriteString(r.Method)
	b.WriteByte(' ')
	b.WriteString(r.URL.EscapedPath())
	if r.URL.RawQuery != "" {
		q := r.URL.Query()
		if len(q) > 0 {
			b.WriteByte('?')
			b.WriteString(q.Encode()) // sorted by key
		}
	}
	for _, h := range vary {
		if v := r.Header.Values(h); len(v) > 0 {
			b.WriteByte('\n')
			b.WriteString(http.CanonicalHeaderKey(h))
			b.WriteByte(':')
			b.WriteString(strings.Join(v, ","))
		}
	}
	return b.String()
}

// httpCache is the middleware's state.
type httpCache struct {
	cs       *CacheStore
	cfg      CacheConfig
	statuses map[int]bool
	vary     map[string]bool
	keep     map[string]bool // canonical names of replayed headers
}

// ToMiddleware validates cfg, fills its defaults and returns the
// middleware. It does no I/O.
func (cfg CacheConfig) ToMiddleware() (echo.MiddlewareFunc, error) {
	if cfg.Store == nil {
		cs, err := NewCacheStore(CacheStoreConfig{Client: cfg.Client, Options: cfg.Options})
		if err != nil {
			return nil, err
		}
		cfg.Store = cs
	}
	if cfg.TTL < 0 || cfg.StaleWhileRevalidate < 0 || cfg.NotFoundTTL < 0 || cfg.MaxBodySize < 0 {
		return nil, fmt.Errorf("%w: negative TTL, StaleWhileRevalidate, NotFoundTTL or MaxBodySize", ErrInvalidCacheConfig)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultCacheTTL
	}
	if cfg.MaxBodySize == 0 {
		cfg.MaxBodySize = DefaultCacheMaxBody
	}
	if cfg.Statuses == nil {
		cfg.Statuses = []int{http.StatusOK}
	}
	if cfg.Vary == nil {
		cfg.Vary = []string{echo.HeaderAccept, echo.HeaderAcceptEncoding, "Accept-Language"}
	}
	if cfg.SessionCookie == "" {
		cfg.SessionCookie = DefaultSessionCookie
	}
	if cfg.Skipper == nil {
		cfg.Skipper = middleware.DefaultSkipper
	}
	h := &httpCache{cs: cfg.Store, cfg: cfg, statuses: map[int]bool{}, vary: map[string]bool{}, keep: map[string]bool{}}
	for _, s := range cfg.Statuses {
		if s < 100 || s >= 500 {
			return nil, fmt.Errorf("%w: status %d cannot be cached", ErrInvalidCacheConfig, s)
		}
		h.statuses[s] = true
	}
	for _, v := range cfg.Vary {
		h.vary[http.CanonicalHeaderKey(v)] = true
	}
	for _, k := range append([]string{echo.HeaderContentType, echo.HeaderContentEncoding, "Content-Language", "Etag", echo.HeaderLastModified, echo.HeaderCacheControl, echo.HeaderVary}, cfg.AllowHeaders...) {
		h.keep[http.CanonicalHeaderKey(k)] = true
	}
	if cfg.Personal && cfg.KeyFunc == nil {
		return nil, fmt.Errorf("%w: Personal needs a KeyFunc that includes the user", ErrInvalidCacheConfig)
	}
	if cfg.Personal && cfg.StaleWhileRevalidate > 0 {
		return nil, fmt.Errorf("%w: Personal routes cannot refresh in the background (the refresh runs without the request's outer middleware)", ErrInvalidCacheConfig)
	}
	if cfg.KeyFunc == nil {
		vary := cfg.Vary
		h.cfg.KeyFunc = func(c echo.Context) string { return DefaultCacheKey(c, vary) }
	}
	return h.middleware, nil
}

func (h *httpCache) middleware(next echo.HandlerFunc) echo.HandlerFunc {
	next = h.withStore(next)
	return func(c echo.Context) error {
		r := c.Request()
		if h.cfg.Skipper(c) || (r.Method != http.MethodGet && r.Method != http.MethodHead) || !h.cacheableRequest(r) {
			h.cs.observeRequest(ResultBypass)
			return next(c)
		}
		key := h.cfg.KeyFunc(c)
		if key == "" {
			h.cs.observeRequest(ResultBypass)
			return next(c)
		}
		var tags []string
		if h.cfg.Tags != nil {
			tags = h.cfg.Tags(c)
			if slices.Contains(tags, "") {
				h.cs.observeRequest(ResultBypass)
				return next(c)
			}
		}
		var (
			ran        bool   // this request ran the handler
			own        *entry // and this is what it captured (nil: streamed)
			handlerErr error
			sendErr    error
		)
		fill := func(ctx context.Context) (*entry, error) {
			ran = true
			if h.cs.b.tracer != nil {
				// The handler runs under the fill's span. (Its context
				// keeps no release of this fill: a cache nested in the
				// handler must not end it.)
				c.SetRequest(c.Request().WithContext(context.WithValue(ctx, releaseKey{}, nil)))
			}
			own, handlerErr = h.capture(ctx, c, next)
			if own != nil {
				// The client gets its response before the entry is stored:
				// the store's round trip is not on its path.
				sendErr = h.sendOwn(c, own, handlerErr)
			}
			if own == nil || handlerErr != nil || !h.storable(own) {
				return nil, nil
			}
			return own, nil
		}
		l, err := h.cs.get(r.Context(), key, tags, fill, func() fillFunc { return h.refiller(c, next) })
		switch {
		case ran && own == nil:
			h.cs.observeRequest(l.res)
			return handlerErr // streamed straight to the client
		case ran:
			h.cs.observeRequest(l.res)
			return sendErr // sent by the fill
		case err != nil || l.e == nil || l.e.notFound || l.e.status == 0:
			// The wait ended without a reusable entry (another fill's
			// response was not storable, or its client went away), or the
			// key holds a cache-service value, not a response: run the
			// handler uncached.
			if l.res == ResultHit || l.res == ResultStale {
				l.res = ResultMiss // found, but not a response
			}
			h.cs.observeRequest(l.res)
			return next(c)
		}
		h.cs.observeRequest(l.res)
		return h.send(c, l.e, "HIT") // a stale entry too: its Age tells
	}
}

// withStore hands the store to the handler (GetCache) when it runs: a hit
// never pays for it.
func (h *httpCache) withStore(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		c.Set(cacheContextKey, h.cs)
		return next(c)
	}
}

// refiller returns the fill used to refresh a stale entry in the
// background, after the request is gone: it runs the handler on a copy of
// the request in a context of its own.
func (h *httpCache) refiller(c echo.Context, next echo.HandlerFunc) fillFunc {
	req := c.Request()
	path, names, values := c.Path(), slices.Clone(c.ParamNames()), slices.Clone(c.ParamValues())
	e := c.Echo()
	return func(ctx context.Context) (*entry, error) {
		c2 := e.NewContext(req.Clone(ctx), &nullWriter{header: http.Header{}})
		c2.SetPath(path)
		c2.SetParamNames(names...)
		c2.SetParamValues(values...)
		own, err := h.capture(ctx, c2, next)
		if err != nil {
			return nil, err
		}
		if own == nil || !h.storable(own) {
			return nil, nil
		}
		return own, nil
	}
}

// nullWriter is the response writer of a background refresh.
type nullWriter struct{ header http.Header }

func (w *nullWriter) Header() http.Header         { return w.header }
func (w *nullWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *nullWriter) WriteHeader(int)             {}

// cacheableRequest reports whether the request may share a cached response:
// not with credentials, unless the route is Personal.
func (h *httpCache) cacheableRequest(r *http.Request) bool {
	if h.cfg.Personal {
		return true
	}
	if r.Header.Get(echo.HeaderAuthorization) != "" {
		return false
	}
	if _, err := r.Cookie(h.cfg.SessionCookie); err == nil {
		return false
	}
	if r.Header.Get(echo.HeaderUpgrade) != "" {
		return false // WebSocket and other upgrades are never cached
	}
	return !strings.Contains(strings.ToLower(r.Header.Get(echo.HeaderCacheControl)), "no-store")
}

// capture runs the handler into a buffer and returns what it produced.
// Streaming responses (Flush) and hijacked connections pass through
// uncaptured: the returned entry is nil then, and the response already went
// out.
func (h *httpCache) capture(ctx context.Context, c echo.Context, next echo.HandlerFunc) (*entry, error) {
	res := c.Response()
	orig := res.Writer
	rec := &captureWriter{orig: orig, header: orig.Header(), max: h.cfg.MaxBodySize, onStream: releaseFrom(ctx)}
	res.Writer = rec
	defer func() {
		if p := recover(); p != nil {
			// Let a recovering middleware answer on the real writer.
			res.Writer = orig
			if rec.wroteHeader && !rec.passthrough {
				res.Committed = false
			}
			panic(p)
		}
	}()
	err := next(c)
	res.Writer = orig
	if rec.passthrough {
		return nil, err
	}
	if !rec.wroteHeader {
		// The handler returned an error (for Echo's error handler) or wrote
		// nothing: nothing to store; the real response goes out as usual.
		res.Committed = false
		return &entry{}, err
	}
	now := h.cs.b.clock.Now()
	ttl := h.cfg.TTL
	if rec.status == http.StatusNotFound {
		ttl = h.cfg.NotFoundTTL
	}
	e := h.cs.newEntry(ttl, h.cfg.StaleWhileRevalidate)
	e.stored = now.UnixMilli()
	e.status = rec.status
	e.body = rec.body.Bytes()
	e.header = http.Header{}
	for k, vs := range orig.Header() {
		if h.keep[k] {
			e.header[k] = slices.Clone(vs)
		}
	}
	if e.header.Get("Etag") == "" {
		sum := sha256.Sum256(e.body)
		e.header.Set("Etag", `"`+base64.RawURLEncoding.EncodeToString(sum[:16])+`"`)
	}
	e.tooBig = rec.overflow
	e.rawHeader = orig.Header()
	return e, err
}

// storable reports whether a captured response may be stored.
func (h *httpCache) storable(e *entry) bool {
	if e.tooBig || e.status >= 500 {
		return false
	}
	if !h.statuses[e.status] && !(e.status == http.StatusNotFound && h.cfg.NotFoundTTL > 0) {
		return false
	}
	hdr := e.rawHeader
	if len(hdr.Values(echo.HeaderSetCookie)) > 0 {
		return false
	}
	if forbidsCaching(hdr.Values(echo.HeaderCacheControl), h.cfg.Personal) {
		return false
	}
	for _, v := range hdr.Values(echo.HeaderVary) {
		for _, name := range strings.Split(v, ",") {
			name = http.CanonicalHeaderKey(strings.TrimSpace(name))
			if name == "*" || (name != "" && !h.vary[name] && !(h.cfg.Personal && (name == echo.HeaderCookie || name == echo.HeaderAuthorization))) {
				return false
			}
		}
	}
	return true
}

// forbidsCaching reports whether Cache-Control values carry a directive
// that keeps this cache from storing the response, or from serving it
// without revalidation (which it never does): no-store or no-cache, and,
// unless the route is Personal, private (with or without field names). A
// Personal route's key names the user (its KeyFunc's contract), so a
// response meant for one user (private, Vary: Cookie or Authorization, as
// the session middleware marks what read a logged-in session) is stored
// under that user's key only, and replayed with its marks for the caches
// in front of the app. Directive names are case-insensitive (RFC 9111
// §5.2).
func forbidsCaching(values []string, personal bool) bool {
	for _, v := range values {
		for _, d := range strings.Split(v, ",") {
			name, _, _ := strings.Cut(d, "=")
			switch strings.ToLower(strings.TrimSpace(name)) {
			case "no-store", "no-cache":
				return true
			case "private":
				if !personal {
					return true
				}
			}
		}
	}
	return false
}

// xCacheValues are the X-Cache header values, shared (and clipped, so an
// append copies).
var xCacheValues = map[string][]string{"HIT": {"HIT"}, "STALE": {"STALE"}, "MISS": {"MISS"}}

// sendOwn writes the response this request's handler produced, captured
// but not sent yet (its headers are already in place), as a MISS.
func (h *httpCache) sendOwn(c echo.Context, e *entry, handlerErr error) error {
	res := c.Response()
	if e.status == 0 {
		return handlerErr // nothing written: Echo's error handler answers
	}
	hdr := res.Header()
	if hdr.Get("Etag") == "" {
		hdr.Set("Etag", e.header.Get("Etag"))
	}
	hdr.Set("X-Cache", "MISS")
	status, body := h.conditional(c, hdr, e)
	// The handler's WriteHeader already ran the Before hooks and marked the
	// response committed; write to the real writer directly.
	res.Status = status
	res.Writer.WriteHeader(status)
	if len(body) > 0 {
		n, err := res.Writer.Write(body)
		res.Size = int64(n)
		if err != nil {
			return err
		}
	}
	return handlerErr
}

// send writes a cached entry as the response.
func (h *httpCache) send(c echo.Context, e *entry, state string) error {
	res := c.Response()
	hdr := res.Header()
	for k, vs := range e.header {
		hdr[k] = vs // clipped: an append by anyone else copies
	}
	age := max(h.cs.b.clock.Now().UnixMilli()-e.stored, 0) / 1000
	hdr["Age"] = []string{strconv.FormatInt(age, 10)}
	hdr["X-Cache"] = xCacheValues[state]
	status, body := h.conditional(c, hdr, e)
	res.WriteHeader(status)
	if len(body) > 0 {
		_, err := res.Write(body)
		return err
	}
	return nil
}

// conditional answers 304 with no body when If-None-Match matches the ETag
// of a 200; HEAD gets no body either.
func (h *httpCache) conditional(c echo.Context, hdr http.Header, e *entry) (int, []byte) {
	r := c.Request()
	if e.status == http.StatusOK {
		if inm := r.Header.Get("If-None-Match"); inm != "" && etagMatch(inm, hdr.Get("Etag")) {
			hdr.Del(echo.HeaderContentLength)
			return http.StatusNotModified, nil
		}
	}
	if r.Method == http.MethodHead {
		return e.status, nil
	}
	return e.status, e.body
}

// etagMatch implements If-None-Match's weak comparison against etag.
func etagMatch(inm, etag string) bool {
	if etag == "" {
		return false
	}
	if strings.TrimSpace(inm) == "*" {
		return true
	}
	want := strings.TrimPrefix(etag, "W/")
	for _, t := range strings.Split(inm, ",") {
		if strings.TrimPrefix(strings.TrimSpace(t), "W/") == want {
			return true
		}
	}
	return false
}

// captureWriter buffers a handler's response. A Flush or Hijack switches it
// to pass-through: the response streams to the client and is not cached.
type captureWriter struct {
	onStream    func() // tells the fill it will store nothing: waiters go on
	orig        http.ResponseWriter
	header      http.Header
	status      int
	body        bytes.Buffer
	max         int
	overflow    bool
	passthrough bool
	wroteHeader bool
}

func (w *captureWriter) Header() http.Header { return w.header }

func (w *captureWriter) WriteHeader(code int) {
	if w.passthrough {
		w.orig.WriteHeader(code)
		return
	}
	if !w.wroteHeader {
		w.status, w.wroteHeader = code, true
	}
}

func (w *captureWriter) Write(p []byte) (int, error) {
	if w.passthrough {
		return w.orig.Write(p)
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.body.Len()+len(p) > w.max {
		// Too big to store: stream it instead of holding it in memory.
		w.overflow = true
		w.stream()
		return w.orig.Write(p)
	}
	return w.body.Write(p)
}

// Flush turns the response into a stream: what was buffered goes out, and
// the rest passes through.
func (w *captureWriter) Flush() {
	w.stream()
	_ = http.NewResponseController(w.orig).Flush()
}

// stream switches to pass-through, sending what was buffered, and releases
// the requests waiting for this fill: a stream is never stored.
func (w *captureWriter) stream() {
	if w.passthrough {
		return
	}
	w.passthrough = true
	w.onStream()
	if w.wroteHeader {
		w.header.Set("X-Cache", "MISS")
		w.orig.WriteHeader(w.status)
	}
	if w.body.Len() > 0 {
		_, _ = w.orig.Write(w.body.Bytes())
	}
	w.body = bytes.Buffer{}
}

// Hijack hands the connection over (WebSocket): nothing was or will be
// written through the buffer.
func (w *captureWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if !w.passthrough {
		w.passthrough = true
		w.onStream()
	}
	return http.NewResponseController(w.orig).Hijack()
}

// Unwrap lets http.ResponseController reach the real writer for what the
// capture does not implement (deadlines, full duplex); Flush and Hijack are
// handled above.
func (w *captureWriter) Unwrap() http.ResponseWriter { return w.orig }
