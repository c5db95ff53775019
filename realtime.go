package redisecho

// Realtime: Server-Sent Events fanned out across instances over Redis.
//
// The Hub (the Redis logic, no Echo types) keeps each channel's history in a
// Redis Stream and announces every event over pub/sub, both written by one
// Lua script. An instance subscribes to a channel while it has local
// clients for it, delivers live messages to them, and re-reads the stream
// whenever it may have missed one (a position skipped, a queue overflow, a
// reconnect, a slot migration), so connected clients never lose an event.
// Hub.Serve writes one client's stream over net/http; SSE / SSEWithConfig
// are the Echo glue on top.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
)

// Defaults of HubConfig and Stream.
const (
	// DefaultHubPartitions is HubConfig.Partitions when zero.
	DefaultHubPartitions = 16
	// DefaultHubMaxLen is HubConfig.MaxLen when zero.
	DefaultHubMaxLen = 1000
	// DefaultHistoryTTL is HubConfig.HistoryTTL when zero.
	DefaultHistoryTTL = time.Hour
	// DefaultMetaTTL is HubConfig.MetaTTL when zero.
	DefaultMetaTTL = 24 * time.Hour
	// DefaultMaxEventSize is HubConfig.MaxEventSize when zero: 64 KiB.
	DefaultMaxEventSize = 64 << 10
	// DefaultClientQueueEvents is HubConfig.ClientQueueEvents when zero.
	DefaultClientQueueEvents = 1024
	// DefaultClientQueueBytes is HubConfig.ClientQueueBytes when zero: 4 MiB.
	DefaultClientQueueBytes = 4 << 20
	// DefaultReplayPage is HubConfig.ReplayPage when zero.
	DefaultReplayPage = 100
	// DefaultUnsubscribeGrace is HubConfig.UnsubscribeGrace when zero.
	DefaultUnsubscribeGrace = 2 * time.Second
	// DefaultPresenceInterval is HubConfig.PresenceInterval when zero.
	DefaultPresenceInterval = 10 * time.Second
	// DefaultMaxConnections is HubConfig.MaxConnections when zero.
	DefaultMaxConnections = 100_000
	// DefaultMaxChannels is Stream.MaxChannels (and SSEConfig.MaxChannels)
	// when zero.
	DefaultMaxChannels = 16
	// DefaultHeartbeat is Stream.Heartbeat (and SSEConfig.Heartbeat) when
	// zero.
	DefaultHeartbeat = 15 * time.Second
	// DefaultRetry is Stream.Retry (and SSEConfig.Retry) when zero.
	DefaultRetry = 3 * time.Second
	// DefaultAliveInterval is Stream.AliveInterval (and
	// SSEConfig.AliveInterval) when zero.
	DefaultAliveInterval = 30 * time.Second
	// DefaultResetEvent is Stream.ResetEvent (and SSEConfig.ResetEvent) when
	// empty.
	DefaultResetEvent = "reset"
	// DefaultPositionParam is SSEConfig.PositionParam when empty.
	DefaultPositionParam = "lastEventId"

	// MaxChannelLength bounds a channel name, in bytes.
	MaxChannelLength = 256
	// MaxEventNameLength bounds Event.Name, in bytes.
	MaxEventNameLength = 64
	// MaxStreamIDLength bounds the stream ID a client may send back
	// (Last-Event-ID or the position parameter), in bytes: a longer one is
	// ignored, as if absent.
	MaxStreamIDLength = 2048
	// streamWriteTimeout bounds one write to a client's stream. A client
	// that accepts nothing for this long is gone.
	streamWriteTimeout = 30 * time.Second
	// kickGrace is how long the last event of a stream that the server
	// ends may take to write: "without waiting", give or take.
	kickGrace = 20 * time.Millisecond
)

// Realtime errors. Serve returns them before it writes anything; the SSE
// glue answers them as JSON: 400 for ErrInvalidChannel and
// ErrTooManyChannels, 503 for ErrHubClosed, ErrHubFull and
// ErrRealtimeUnavailable.
var (
	// ErrInvalidChannel: a channel name is empty, longer than
	// MaxChannelLength, not UTF-8, holds a control character, or appears
	// twice in one stream.
	ErrInvalidChannel = errors.New("redisecho: invalid channel name")
	// ErrTooManyChannels: a stream asks for more than its MaxChannels.
	ErrTooManyChannels = errors.New("redisecho: too many channels")
	// ErrEventTooLarge: Publish got an event whose Name and Data exceed
	// MaxEventSize.
	ErrEventTooLarge = errors.New("redisecho: event too large")
	// ErrInvalidEvent: an event Name longer than MaxEventNameLength or with
	// a control character (SSE cannot carry it).
	ErrInvalidEvent = errors.New("redisecho: invalid event name")
	// ErrHubClosed: the hub was shut down.
	ErrHubClosed = errors.New("redisecho: hub closed")
	// ErrHubFull: the hub already serves MaxConnections streams.
	ErrHubFull = errors.New("redisecho: too many streams")
	// ErrRealtimeUnavailable: a channel's Redis node has its breaker open,
	// or did not answer in time while the stream started.
	ErrRealtimeUnavailable = errors.New("redisecho: realtime unavailable")
)

// Event is one message of a channel.
type Event struct {
	// Name is the SSE "event:" field. Empty means the browser's default,
	// "message". At most MaxEventNameLength bytes, no control characters
	// (':' is fine: "chat:message").
	Name string
	// Data is the "data:" payload, usually JSON. Each line of it becomes
	// one "data:" line; CR, LF and CRLF all end a line.
	Data []byte
}

// Position is where an event sits in its channel: a counter that starts
// at 1, and the epoch of the channel's history. The epoch changes when the
// history is lost (expired, evicted, deleted, Redis restarted without
// persistence); positions of different epochs do not compare.
type Position struct {
	// Offset is the event's number in its channel, 1 for the first of an
	// epoch. The zero Position is "before any event".
	Offset uint64
	// Epoch is the history's epoch: epochLen base62 characters.
	Epoch string
}

// String returns "<epoch>-<offset>", e.g. "Xy3kQ9-42".
func (p Position) String() string {
	return p.Epoch + "-" + strconv.FormatUint(p.Offset, 10)
}

// HubConfig configures a Hub.
type HubConfig struct {
	// Client is the rueidis client. Required. The hub never closes it.
	Client rueidis.Client
	// Options is the shared plumbing (Prefix, Timeout, Breaker, Clock,
	// Logger). Timeout bounds every Redis call; a stream's start waits at
	// most twice that.
	Options
	// Partitions is the number of hash tags channels are spread over (by
	// FNV-1a of their name). On a cluster each partition is one slot and
	// one subscription connection per instance; on a standalone server one
	// connection serves them all. Changing it moves every channel to a new
	// key, so running instances must agree on it. Default:
	// DefaultHubPartitions (16).
	Partitions int
	// MaxLen is how many events each channel keeps for resume. Trimming is
	// approximate: at least MaxLen are kept, a hundred or so more at times.
	// Default: DefaultHubMaxLen (1000).
	MaxLen int64
	// HistoryTTL is how long a channel's events live after its last
	// publish. Default: DefaultHistoryTTL (1 hour).
	HistoryTTL time.Duration
	// MetaTTL is how long a channel's epoch and counter live after its
	// last publish. At least HistoryTTL, so a client that missed nothing
	// resumes without a reset after the events expired. Default:
	// DefaultMetaTTL (24 hours).
	MetaTTL time.Duration
	// MaxEventSize bounds an event's Name plus Data, in bytes. Default:
	// DefaultMaxEventSize (64 KiB).
	MaxEventSize int
	// ClientQueueEvents bounds each client's queue of live events not yet
	// written. A client beyond it is disconnected as slow, with its
	// position, to resume. Default: DefaultClientQueueEvents (1024).
	ClientQueueEvents int
	// ClientQueueBytes bounds the same queue in bytes of the events as
	// sent (an empty queue still takes one event, whatever its size).
	// Default: DefaultClientQueueBytes (4 MiB).
	ClientQueueBytes int
	// ReplayPage is how many events one stream read fetches, on resume and
	// on re-reads, at most: a page is also held to about 1 MiB of events
	// of MaxEventSize (16 at the default 64 KiB), so a resuming client
	// holds a bounded page. Default: DefaultReplayPage (100).
	ReplayPage int
	// UnsubscribeGrace is how long an instance stays subscribed to a
	// channel after its last local client left, so reconnect storms do not
	// churn subscriptions. Default: DefaultUnsubscribeGrace (2 s).
	UnsubscribeGrace time.Duration
	// PresenceInterval is how often an instance refreshes its clients'
	// presence entries (one pipelined batch per node). Default:
	// DefaultPresenceInterval (10 s).
	PresenceInterval time.Duration
	// PresenceTTL is how long a presence entry lives without a refresh: an
	// instance that dies without saying goodbye disappears after it.
	// Default: three PresenceIntervals.
	PresenceTTL time.Duration
	// MaxConnections bounds the streams this hub serves at once; one more
	// gets ErrHubFull. Default: DefaultMaxConnections (100,000).
	MaxConnections int
	// Instance names this hub in presence entries. Default:
	// "<hostname>-<pid>-<4 random characters>".
	Instance string
}

// HubStats counts what a Hub did since it was created.
type HubStats struct {
	// Connections is the number of open streams.
	Connections int64 `json:"connections"`
	// Channels is the number of channels this instance is subscribed to
	// (user channels of Disconnect included).
	Channels int64 `json:"channels"`
	// Published counts successful Publish calls.
	Published uint64 `json:"published"`
	// Delivered counts events queued or replayed to clients.
	Delivered uint64 `json:"delivered"`
	// DroppedSlow counts clients disconnected for falling behind.
	DroppedSlow uint64 `json:"dropped_slow"`
	// Resumes counts streams that resumed at least one channel from a
	// position.
	Resumes uint64 `json:"resumes"`
	// Resets counts reset events sent to clients.
	Resets uint64 `json:"resets"`
	// Rereads counts stream re-reads after a skipped position, a queue
	// overflow, a resubscribe or a slot migration.
	Rereads uint64 `json:"rereads"`
}

// PresenceInfo is who is connected to a channel, across instances.
type PresenceInfo struct {
	// Channel is the channel asked about.
	Channel string `json:"channel"`
	// Count is the number of live connections, all of them.
	Count int `json:"count"`
	// Members are at most the limit asked for, sorted oldest connection
	// first. When there are more, which ones is unspecified (those whose
	// entries were refreshed longest ago), not necessarily the oldest.
	Members []Member `json:"members"`
}

// Member is one connection in a PresenceInfo.
type Member struct {
	// ConnID identifies the connection (random, 16 characters).
	ConnID string `json:"connId"`
	// UserID is the stream's user, empty for an anonymous one.
	UserID string `json:"userId,omitempty"`
	// Instance is the hub serving it (HubConfig.Instance).
	Instance string `json:"instance"`
	// Since is when the connection started.
	Since time.Time `json:"since"`
}

// Hub fans events out to Server-Sent Event streams across instances, over
// Redis. Create one per app with NewHub; it is safe for concurrent use.
// Shut it down with Shutdown before the HTTP server, or register that with
// http.Server.RegisterOnShutdown.
type Hub struct {
	b     *backend
	cfg   HubConfig
	keys  []KeyGroup // one per partition
	page  int        // events per stream read: ReplayPage, bounded in bytes
	conns []*hubConn // created lazily, one per connection partition

	mu       sync.Mutex
	chans    map[string]*hubChannel
	clients  map[*sseClient]struct{}
	closed   bool
	started  bool // background loops running
	streams  sync.WaitGroup
	stop     chan struct{}
	stopOnce sync.Once
	loops    sync.WaitGroup

	presence presenceState

	published, delivered, droppedSlow, resumes, resets, rereads atomic.Uint64
	connections, channels                                       atomic.Int64
}

// NewHub validates cfg, fills its defaults and returns the hub. It does no
// I/O: connections open with the first stream.
func NewHub(cfg HubConfig) (*Hub, error) {
	b, err := newBackend("realtime", cfg.Client, cfg.Options)
	if err != nil {
		return nil, err
	}
	def := func(d *time.Duration, v time.Duration, name string) error {
		if *d < 0 {
			return fmt.Errorf("realtime: %s must not be negative", name)
		}
		if *d == 0 {
			*d = v
		}
		return nil
	}
	defInt := func(d *int, v int, name string) error {
		if *d < 0 {
			return fmt.Errorf("realtime: %s must not be negative", name)
		}
		if *d == 0 {
			*d = v
		}
		return nil
	}
	if cfg.MaxLen < 0 {
		return nil, errors.New("realtime: MaxLen must not be negative")
	}
	if cfg.MaxLen == 0 {
		cfg.MaxLen = DefaultHubMaxLen
	}
	if err := errors.Join(
		defInt(&cfg.Partitions, DefaultHubPartitions, "Partitions"),
		def(&cfg.HistoryTTL, DefaultHistoryTTL, "HistoryTTL"),
		def(&cfg.MetaTTL, max(DefaultMetaTTL, cfg.HistoryTTL), "MetaTTL"),
		defInt(&cfg.MaxEventSize, DefaultMaxEventSize, "MaxEventSize"),
		defInt(&cfg.ClientQueueEvents, DefaultClientQueueEvents, "ClientQueueEvents"),
		defInt(&cfg.ClientQueueBytes, DefaultClientQueueBytes, "ClientQueueBytes"),
		defInt(&cfg.ReplayPage, DefaultReplayPage, "ReplayPage"),
		def(&cfg.UnsubscribeGrace, DefaultUnsubscribeGrace, "UnsubscribeGrace"),
		def(&cfg.PresenceInterval, DefaultPresenceInterval, "PresenceInterval"),
		def(&cfg.PresenceTTL, 3*cfg.PresenceInterval, "PresenceTTL"),
		defInt(&cfg.MaxConnections, DefaultMaxConnections, "MaxConnections"),
	); err != nil {
		return nil, err
	}
	if cfg.MetaTTL < cfg.HistoryTTL {
		return nil, errors.New("realtime: MetaTTL must be at least HistoryTTL")
	}
	if cfg.ClientQueueBytes < cfg.MaxEventSize+64 {
		// Else one large event drops every client as slow.
		return nil, errors.New("realtime: ClientQueueBytes must hold at least one event of MaxEventSize")
	}
	if cfg.PresenceTTL <= cfg.PresenceInterval {
		return nil, errors.New("realtime: PresenceTTL must be longer than PresenceInterval")
	}
	if cfg.Partitions > 1024 {
		return nil, errors.New("realtime: at most 1024 Partitions")
	}
	if cfg.Instance == "" {
		host, _ := os.Hostname()
		cfg.Instance = host + "-" + strconv.Itoa(os.Getpid()) + "-" + randomBase62(4)
	}
	if len(cfg.Instance) > 128 || strings.ContainsAny(cfg.Instance, "|") || hasControl(cfg.Instance) {
		return nil, errors.New("realtime: Instance must be at most 128 bytes, without '|' or control characters")
	}
	h := &Hub{
		b:       b,
		cfg:     cfg,
		keys:    make([]KeyGroup, cfg.Partitions),
		chans:   map[string]*hubChannel{},
		clients: map[*sseClient]struct{}{},
		stop:    make(chan struct{}),
	}
	for p := range h.keys {
		h.keys[p] = b.keys.Group("rt", strconv.Itoa(p))
	}
	h.page = min(cfg.ReplayPage, max(1, replayPageBytes/cfg.MaxEventSize))
	h.presence.init()
	return h, nil
}

// Instance returns the hub's name in presence entries.
func (h *Hub) Instance() string { return h.cfg.Instance }

// Stats returns the hub's counters.
func (h *Hub) Stats() HubStats {
	return HubStats{
		Connections: h.connections.Load(),
		Channels:    h.channels.Load(),
		Published:   h.published.Load(),
		Delivered:   h.delivered.Load(),
		DroppedSlow: h.droppedSlow.Load(),
		Resumes:     h.resumes.Load(),
		Resets:      h.resets.Load(),
		Rereads:     h.rereads.Load(),
	}
}

// channelKeys are the Redis names of one channel, all in its partition's
// hash tag.
type channelKeys struct {
	part                             int
	stream, meta, presence, announce string
}

func (h *Hub) keysOf(channel string) channelKeys {
	f := fnv.New32a()
	f.Write([]byte(channel))
	p := int(f.Sum32() % uint32(len(h.keys)))
	g := h.keys[p]
	return channelKeys{
		part:     p,
		stream:   g.Key("s", channel),
		meta:     g.Key("m", channel),
		presence: g.Key("p", channel),
		announce: g.Key("c", channel),
	}
}

// validChannel reports whether name may be a channel.
func validChannel(name string) bool {
	return name != "" && len(name) <= MaxChannelLength && utf8.ValidString(name) && !hasControl(name)
}

func hasControl(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return true
		}
	}
	return false
}

// userChannel is the internal channel that carries Disconnect(userID). Its
// leading NUL keeps it apart from every channel a stream may ask for.
func userChannel(userID string) string { return "\x00user:" + userID }

// publishScript appends an event to a channel's stream and announces it,
// atomically.
//
// KEYS[1] the stream, KEYS[2] the meta hash (e: epoch, s: last offset).
// ARGV[1] event name, ARGV[2] data, ARGV[3] MaxLen, ARGV[4] HistoryTTL ms,
// ARGV[5] MetaTTL ms, ARGV[6] the epoch to start if the meta is gone,
// ARGV[7] the pub/sub channel (same hash tag), ARGV[8] "1" for SPUBLISH.
// Returns {offset, epoch}. The announcement is "<offset>:<epoch>:<name>\n<data>".
//
// A new epoch deletes what is left of an older stream: its IDs would
// otherwise refuse the new epoch's first offset.
var publishScript = rueidis.NewLuaScript(`
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch)
end
local off = redis.call('HINCRBY', KEYS[2], 's', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], off .. '-0', 'e', ARGV[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local msg = off .. ':' .. epoch .. ':' .. ARGV[1] .. '\n' .. ARGV[2]
if ARGV[8] == '1' then
  redis.call('SPUBLISH', ARGV[7], msg)
else
  redis.call('PUBLISH', ARGV[7], msg)
end
return {off, epoch}
`)

// Publish appends ev to channel's history and delivers it to the channel's
// streams on every instance. It returns the event's position. One Redis
// call (a Lua script) under the Timeout; an error means the event may or
// may not have been published (a timeout), or was not (any other error).
func (h *Hub) Publish(ctx context.Context, channel string, ev Event) (Position, error) {
	if !validChannel(channel) {
		return Position{}, ErrInvalidChannel
	}
	return h.publish(ctx, channel, ev)
}

func (h *Hub) publish(ctx context.Context, channel string, ev Event) (Position, error) {
	if len(ev.Name) > MaxEventNameLength || hasControl(ev.Name) || !utf8.ValidString(ev.Name) {
		return Position{}, ErrInvalidEvent
	}
	if len(ev.Name)+len(ev.Data) > h.cfg.MaxEventSize {
		return Position{}, ErrEventTooLarge
	}
	k := h.keysOf(channel)
	sharded := "0"
	if h.b.client.Mode() == rueidis.ClientModeCluster {
		sharded = "1"
	}
	res := h.b.Exec(ctx, publishScript, []string{k.stream, k.meta}, []string{
		ev.Name, string(ev.Data),
		strconv.FormatInt(h.cfg.MaxLen, 10),
		strconv.FormatInt(h.cfg.HistoryTTL.Milliseconds(), 10),
		strconv.FormatInt(h.cfg.MetaTTL.Milliseconds(), 10),
		newEpoch(), k.announce, sharded,
	})
	pos, err := parsePosition(res)
	if err != nil {
		return Position{}, fmt.Errorf("realtime: publish: %w", err)
	}
	h.published.Add(1)
	h.b.observe(Observation{Kind: ObsPublish, N: 1})
	return pos, nil
}

func parsePosition(res rueidis.RedisResult) (Position, error) {
	arr, err := res.ToArray()
	if err != nil {
		return Position{}, err
	}
	if len(arr) != 2 {
		return Position{}, errors.New("unexpected reply")
	}
	off, err := arr[0].AsInt64()
	if err != nil {
		return Position{}, err
	}
	epoch, err := arr[1].ToString()
	if err != nil {
		return Position{}, err
	}
	if off < 0 || !validEpoch(epoch) {
		return Position{}, errors.New("unexpected reply")
	}
	return Position{Offset: uint64(off), Epoch: epoch}, nil
}

// Disconnect ends userID's streams on every instance, with a last
// "disconnect" event of reason "disconnected": call it on logout and on
// log-out-everywhere, so a revoked session stops receiving private events.
// It publishes on the user's internal channel (one Redis call), so an
// instance that was cut off from Redis at that moment still ends them
// once it catches up.
func (h *Hub) Disconnect(ctx context.Context, userID string) error {
	if userID == "" || len(userID) > MaxUserIDLength {
		return fmt.Errorf("realtime: disconnect: invalid user ID")
	}
	_, err := h.publish(ctx, userChannel(userID), Event{Name: "disconnect"})
	return err
}

const (
	base62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	// epochLen is the length of an epoch, in base62 characters.
	epochLen = 6
	// hashLen is the length of a channel's hash in a stream ID.
	hashLen = 6
)

func randomBase62(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = base62[int(b[i])%len(base62)]
	}
	return string(b)
}

// noEpoch is the epoch of a channel without history (never published to,
// or its history lost), always at offset 0. Every event of the channel's
// next epoch comes after it. newEpoch never returns it.
const noEpoch = "000000"

func newEpoch() string {
	for {
		if e := randomBase62(epochLen); e != noEpoch {
			return e
		}
	}
}

func validEpoch(e string) bool {
	if len(e) != epochLen {
		return false
	}
	for i := 0; i < len(e); i++ {
		if strings.IndexByte(base62, e[i]) < 0 {
			return false
		}
	}
	return true
}

// channelHash is a channel's name in a stream ID: 6 base62 digits of the
// FNV-1a 64-bit hash of the name (35.7 bits).
func channelHash(name string) string {
	f := fnv.New64a()
	f.Write([]byte(name))
	v := f.Sum64()
	var b [hashLen]byte
	for i := range b {
		b[i] = base62[v%62]
		v /= 62
	}
	return string(b[:])
}

// A stream ID is the position of every channel of a connection, in the
// order the stream asked for them:
//
//	"1" ( "." hash epoch offset )*
//
// "1" is the format's version; hash is channelHash of the name (6 base62),
// epoch the channel's epoch (6 base62), offset the channel's last delivered
// offset in base36. Names are not in it, so it stays short (at most 26
// bytes per channel, 417 for 16), and a channel the request no longer asks
// for simply drops out. A malformed ID, one longer than MaxStreamIDLength,
// or an entry whose hash matches no channel asked for, is ignored.

// streamPos is one entry of a decoded stream ID.
type streamPos struct {
	hash string
	pos  Position
}

// maxStreamIDEntries bounds the entries decodeStreamID returns.
const maxStreamIDEntries = 64

// decodeStreamID parses a stream ID. ok is false for anything malformed;
// it never panics and returns at most maxStreamIDEntries entries.
func decodeStreamID(id string) (entries []streamPos, ok bool) {
	if len(id) > MaxStreamIDLength || len(id) < 1 || id[0] != '1' {
		return nil, false
	}
	rest := id[1:]
	for rest != "" {
		if rest[0] != '.' {
			return nil, false
		}
		rest = rest[1:]
		end := strings.IndexByte(rest, '.')
		if end < 0 {
			end = len(rest)
		}
		ent := rest[:end]
		rest = rest[end:]
		if len(ent) <= hashLen+epochLen || len(ent) > hashLen+epochLen+13 {
			return nil, false
		}
		hash, epoch, off := ent[:hashLen], ent[hashLen:hashLen+epochLen], ent[hashLen+epochLen:]
		if !validEpoch(hash) || !validEpoch(epoch) {
			return nil, false
		}
		o, err := strconv.ParseUint(off, 36, 64)
		if err != nil || strings.ToLower(off) != off || (len(off) > 1 && off[0] == '0') {
			return nil, false
		}
		if len(entries) == maxStreamIDEntries {
			return nil, false
		}
		entries = append(entries, streamPos{hash: hash, pos: Position{Offset: o, Epoch: epoch}})
	}
	return entries, true
}

// appendStreamID appends the stream ID of positions (one per channel, in
// order, with their hashes) to b.
func appendStreamID(b []byte, hashes []string, pos []Position) []byte {
	b = append(b, '1')
	for i := range pos {
		b = append(b, '.')
		b = append(b, hashes[i]...)
		b = append(b, pos[i].Epoch...)
		b = strconv.AppendUint(b, pos[i].Offset, 36)
	}
	return b
}

// encodedEvent is an event as SSE text without its id line, shared by
// every client it goes to: head is "event: <name>\n", body the data lines
// and the blank line.
type encodedEvent struct {
	head, body []byte
}

func (e *encodedEvent) size() int { return len(e.head) + len(e.body) + 64 }

func encodeEvent(name string, data []byte) *encodedEvent {
	e := &encodedEvent{}
	if name != "" {
		e.head = make([]byte, 0, len(name)+8)
		e.head = append(e.head, "event: "...)
		e.head = append(e.head, name...)
		e.head = append(e.head, '\n')
	}
	body := make([]byte, 0, len(data)+16)
	for {
		i := bytes.IndexAny(data, "\r\n")
		line := data
		if i >= 0 {
			line = data[:i]
		}
		body = append(body, "data: "...)
		body = append(body, line...)
		body = append(body, '\n')
		if i < 0 {
			break
		}
		if data[i] == '\r' && i+1 < len(data) && data[i+1] == '\n' {
			i++
		}
		data = data[i+1:]
	}
	e.body = append(body, '\n')
	return e
}

// liveMsg is an announcement as received: the event and its position.
type liveMsg struct {
	ch   *hubChannel
	pos  Position
	ev   *encodedEvent
	size int64 // the bytes it holds, for the inbox's bound
}

// parseAnnouncement splits "<offset>:<epoch>:<name>\n<data>".
func parseAnnouncement(msg string) (Position, string, string, bool) {
	nl := strings.IndexByte(msg, '\n')
	if nl < 0 {
		return Position{}, "", "", false
	}
	head, data := msg[:nl], msg[nl+1:]
	i := strings.IndexByte(head, ':')
	if i < 0 {
		return Position{}, "", "", false
	}
	off, err := strconv.ParseUint(head[:i], 10, 64)
	if err != nil {
		return Position{}, "", "", false
	}
	rest := head[i+1:]
	j := strings.IndexByte(rest, ':')
	if j < 0 || !validEpoch(rest[:j]) {
		return Position{}, "", "", false
	}
	return Position{Offset: off, Epoch: rest[:j]}, rest[j+1:], data, true
}

// hubChannel is an instance's state for one channel with local interest.
type hubChannel struct {
	name     string
	keys     channelKeys
	conn     *hubConn
	internal bool // a user channel: its events end streams, they are not sent

	// refs counts the streams that use the channel (guarded by Hub.mu);
	// grace is the unsubscribe timer once it drops to 0.
	refs  int
	grace *time.Timer
	gone  bool // removed from the hub: a new hubChannel takes over the name

	// ready is closed once the channel has its first position (synced),
	// after its subscription was confirmed.
	ready chan struct{}

	reread atomic.Bool // the worker must re-read the stream (or sync)

	mu     sync.Mutex
	synced bool
	pos    Position // the last event delivered to local clients
	subs   map[*sseClient]*chanSub
	early  []liveMsg // announcements received before the first sync
}

// chanSub is one stream's subscription to a channel: the index of the
// channel in the stream's ID, and the last offset queued to it.
type chanSub struct {
	idx    int
	cursor uint64
}

// replayPageBytes bounds a stream read in events of MaxEventSize (see
// HubConfig.ReplayPage); replayFlush is how much SSE text a replay buffers
// before it writes.
const (
	replayPageBytes = 1 << 20
	replayFlush     = 256 << 10
)

// maxEarly bounds the announcements a channel keeps before its first sync;
// beyond it the sync re-reads the stream instead.
const maxEarly = 64

// acquire returns the hub's channel for name, subscribing when it is new
// to this instance, and counts one more user of it.
func (h *Hub) acquire(name string, internal bool) (*hubChannel, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, ErrHubClosed
	}
	h.startLocked()
	ch := h.chans[name]
	if ch == nil {
		k := h.keysOf(name)
		ch = &hubChannel{
			name: name, keys: k, internal: internal,
			conn:  h.connOf(k.part),
			ready: make(chan struct{}),
			subs:  map[*sseClient]*chanSub{},
		}
		h.chans[name] = ch
		h.channels.Add(1)
		ch.conn.want(ch)
	}
	ch.refs++
	if ch.grace != nil {
		ch.grace.Stop()
		ch.grace = nil
	}
	return ch, nil
}

// release counts one user less of ch; after UnsubscribeGrace without users
// the instance unsubscribes.
func (h *Hub) release(ch *hubChannel) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ch.refs--
	if ch.refs > 0 || ch.gone {
		return
	}
	if h.closed {
		h.dropLocked(ch)
		return
	}
	ch.grace = time.AfterFunc(h.cfg.UnsubscribeGrace, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if ch.refs == 0 && !ch.gone {
			h.dropLocked(ch)
		}
	})
}

func (h *Hub) dropLocked(ch *hubChannel) {
	if ch.grace != nil {
		ch.grace.Stop()
		ch.grace = nil
	}
	ch.gone = true
	delete(h.chans, ch.name)
	h.channels.Add(-1)
	ch.conn.unwant(ch)
}

// startLocked starts the background loops with the first stream.
func (h *Hub) startLocked() {
	if h.started {
		return
	}
	h.started = true
	n := len(h.keys)
	if h.b.client.Mode() != rueidis.ClientModeCluster {
		n = 1
	}
	h.conns = make([]*hubConn, n)
	for i := range h.conns {
		h.conns[i] = newHubConn(h, i)
	}
	h.loops.Add(1)
	go h.presenceLoop()
}

func (h *Hub) connOf(part int) *hubConn { return h.conns[part%len(h.conns)] }

// hubConn is one subscription connection (a partition's on a cluster, the
// only one on a standalone server) and the worker that delivers what it
// receives. The reader hands announcements over without blocking: when the
// inbox is full, the channel is marked for a stream re-read instead.
type hubConn struct {
	h   *Hub
	idx int

	mu         sync.Mutex
	wanted     map[string]*hubChannel // by announce channel
	subscribed map[string]bool        // what Redis was told
	leaving    map[string]int         // unsubscribes not yet confirmed
	running    bool

	inbox      chan liveMsg
	inboxBytes atomic.Int64  // bytes held by inbox
	changed    chan struct{} // the wanted set changed
	kick       chan struct{} // some channel needs a re-read
}

// inboxSize is the capacity of a connection's hand-off queue.
const inboxSize = 4096

// maxInboxBytes bounds the bytes a connection's hand-off queue holds (the
// events' SSE encoding; a user channel's announcements): beyond it, as beyond
// inboxSize, the channel is marked for a stream re-read instead.
const maxInboxBytes = 16 << 20

func newHubConn(h *Hub, idx int) *hubConn {
	return &hubConn{
		h: h, idx: idx,
		wanted:     map[string]*hubChannel{},
		subscribed: map[string]bool{},
		leaving:    map[string]int{},
		inbox:      make(chan liveMsg, inboxSize),
		changed:    make(chan struct{}, 1),
		kick:       make(chan struct{}, 1),
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (c *hubConn) want(ch *hubChannel) {
	c.mu.Lock()
	c.wanted[ch.keys.announce] = ch
	if c.subscribed[ch.keys.announce] {
		// Re-acquired before the unsubscribe of its previous life: the
		// subscription stands, the new channel only needs its position.
		ch.reread.Store(true)
		signal(c.kick)
	}
	if !c.running {
		c.running = true
		c.h.loops.Add(2)
		go c.subscriber()
		go c.worker()
	}
	c.mu.Unlock()
	signal(c.changed)
}

func (c *hubConn) unwant(ch *hubChannel) {
	c.mu.Lock()
	if c.wanted[ch.keys.announce] == ch {
		delete(c.wanted, ch.keys.announce)
	}
	c.mu.Unlock()
	signal(c.changed)
}

// onMessage runs on the rueidis reader: it must not block.
func (c *hubConn) onMessage(m rueidis.PubSubMessage) {
	c.mu.Lock()
	ch := c.wanted[m.Channel]
	c.mu.Unlock()
	if ch == nil {
		return
	}
	pos, name, data, ok := parseAnnouncement(m.Message)
	if !ok {
		return
	}
	var ev *encodedEvent
	if !ch.internal {
		ev = encodeEvent(name, []byte(data))
	}
	size := int64(len(m.Message))
	if ev != nil {
		size = int64(ev.size()) // what the queue holds: up to 7 times more
	}
	if c.inboxBytes.Add(size) <= maxInboxBytes {
		select {
		case c.inbox <- liveMsg{ch: ch, pos: pos, ev: ev, size: size}:
			return
		default:
		}
	}
	c.inboxBytes.Add(-size)
	ch.reread.Store(true)
	signal(c.kick)
}

// onSubscription runs on the rueidis reader. An unsubscribe that this
// instance did not ask for is Redis moving the slot (or the server
// dropping the subscription): it signals moved, the connection's, so
// subscribe again, from scratch. (A slot move sends one per channel: the
// ones after the first are about a connection already given up.)
func (c *hubConn) onSubscription(moved chan struct{}, s rueidis.PubSubSubscription) {
	if s.Kind != "sunsubscribe" && s.Kind != "unsubscribe" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.leaving[s.Channel] > 0 {
		c.leaving[s.Channel]--
		if c.leaving[s.Channel] == 0 {
			delete(c.leaving, s.Channel)
		}
		return
	}
	if c.subscribed[s.Channel] {
		signal(moved)
	}
}

// subscriber keeps the connection subscribed to the wanted channels:
// it dials, subscribes, and starts over after a drop or a slot move,
// marking every channel for a stream re-read each time, so events
// published while it was away are delivered from the stream.
func (c *hubConn) subscriber() {
	defer c.h.loops.Done()
	backoff := 50 * time.Millisecond
	for {
		select {
		case <-c.h.stop:
			return
		default:
		}
		conn, _ := c.h.b.client.Dedicate() // closed, never released
		moved := make(chan struct{}, 1)
		wait := conn.SetPubSubHooks(rueidis.PubSubHooks{
			OnMessage:      c.onMessage,
			OnSubscription: func(s rueidis.PubSubSubscription) { c.onSubscription(moved, s) },
		})
		c.mu.Lock()
		c.subscribed = map[string]bool{}
		c.leaving = map[string]int{}
		c.mu.Unlock()
		err := c.reconcile(conn, true)
		if err == nil {
			backoff = 50 * time.Millisecond
			err = c.serve(conn, wait, moved)
		}
		// The connection is closed, not released: the pool would clean it
		// up with an UNSUBSCRIBE that waits, without a deadline, for a
		// server that may not answer (a paused one held Shutdown for 12 s).
		conn.Close()
		if err == nil { // stopping
			return
		}
		c.h.b.log.Error("realtime: subscription connection lost, resubscribing", err, "partition", c.idx)
		select {
		case <-c.h.stop:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// serve runs a subscribed connection until it drops (an error) or the hub
// stops (nil).
func (c *hubConn) serve(conn rueidis.DedicatedClient, wait <-chan error, moved <-chan struct{}) error {
	for {
		select {
		case err, ok := <-wait:
			if !ok || err == nil {
				err = errors.New("subscription connection closed")
			}
			return err
		case <-moved:
			return errors.New("slot moved (sunsubscribe)")
		case <-c.changed:
			if err := c.reconcile(conn, false); err != nil {
				return err
			}
		case <-c.h.stop:
			c.mu.Lock()
			var names []string
			for n := range c.subscribed {
				names = append(names, n)
			}
			c.mu.Unlock()
			if len(names) > 0 {
				ctx, cancel := context.WithTimeout(context.Background(), c.h.b.timeout)
				_ = conn.Do(ctx, c.unsubscribeCmd(conn, names)).Error()
				cancel()
			}
			return nil
		}
	}
}

func (c *hubConn) sharded() bool { return c.h.b.client.Mode() == rueidis.ClientModeCluster }

func (c *hubConn) subscribeCmd(conn rueidis.DedicatedClient, names []string) rueidis.Completed {
	if c.sharded() {
		return conn.B().Ssubscribe().Channel(names...).Build()
	}
	return conn.B().Subscribe().Channel(names...).Build()
}

func (c *hubConn) unsubscribeCmd(conn rueidis.DedicatedClient, names []string) rueidis.Completed {
	if c.sharded() {
		return conn.B().Sunsubscribe().Channel(names...).Build()
	}
	return conn.B().Unsubscribe().Channel(names...).Build()
}

// reconcile subscribes to the wanted channels not yet subscribed and
// unsubscribes from the others, in batches. The channels it subscribes to
// are marked for a sync or re-read once Redis confirmed. all marks every
// wanted channel (a new connection).
func (c *hubConn) reconcile(conn rueidis.DedicatedClient, all bool) error {
	c.mu.Lock()
	var sub, unsub []string
	for n := range c.wanted {
		if !c.subscribed[n] {
			sub = append(sub, n)
		}
	}
	for n := range c.subscribed {
		if c.wanted[n] == nil {
			unsub = append(unsub, n)
			delete(c.subscribed, n)
			c.leaving[n]++
		}
	}
	c.mu.Unlock()
	const batch = 256
	for len(unsub) > 0 {
		n := min(batch, len(unsub))
		ctx, cancel := context.WithTimeout(context.Background(), c.h.b.timeout)
		err := conn.Do(ctx, c.unsubscribeCmd(conn, unsub[:n])).Error()
		cancel()
		if err != nil {
			return err
		}
		unsub = unsub[n:]
	}
	for len(sub) > 0 {
		n := min(batch, len(sub))
		ctx, cancel := context.WithTimeout(context.Background(), c.h.b.timeout)
		err := conn.Do(ctx, c.subscribeCmd(conn, sub[:n])).Error()
		cancel()
		if err != nil {
			return err
		}
		c.mu.Lock()
		for _, name := range sub[:n] {
			c.subscribed[name] = true
			if ch := c.wanted[name]; ch != nil && !all {
				ch.reread.Store(true)
			}
		}
		c.mu.Unlock()
		sub = sub[n:]
	}
	if all {
		c.mu.Lock()
		for _, ch := range c.wanted {
			ch.reread.Store(true)
		}
		c.mu.Unlock()
	}
	signal(c.kick)
	return nil
}

// worker delivers announcements and runs the re-reads, for every channel
// of the connection, in order.
func (c *hubConn) worker() {
	defer c.h.loops.Done()
	var retry <-chan time.Time
	for {
		select {
		case <-c.h.stop:
			return
		case m := <-c.inbox:
			c.inboxBytes.Add(-m.size)
			c.h.live(m)
		case <-c.kick:
			if !c.rereadMarked() {
				retry = time.After(100 * time.Millisecond)
			}
		case <-retry:
			retry = nil
			if !c.rereadMarked() {
				retry = time.After(500 * time.Millisecond)
			}
		}
	}
}

// rereadMarked re-reads every marked channel; false when some failed (they
// stay marked).
func (c *hubConn) rereadMarked() bool {
	c.mu.Lock()
	var marked []*hubChannel
	for name, ch := range c.wanted {
		// A channel whose subscription is not confirmed yet waits: its
		// confirmation marks it again.
		if ch.reread.Load() && c.subscribed[name] {
			marked = append(marked, ch)
		}
	}
	c.mu.Unlock()
	// Channels without a position yet are synced together first.
	var fresh []*hubChannel
	rest := marked[:0]
	for _, ch := range marked {
		ch.mu.Lock()
		synced := ch.synced
		ch.mu.Unlock()
		ch.reread.Store(false)
		if synced {
			rest = append(rest, ch)
		} else {
			fresh = append(fresh, ch)
		}
	}
	ok := c.h.syncAll(fresh)
	for _, ch := range rest {
		if err := c.h.reread(ch); err != nil {
			ch.reread.Store(true)
			ok = false
		}
	}
	return ok
}

// live handles one announcement.
func (h *Hub) live(m liveMsg) {
	ch := m.ch
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if !ch.synced {
		if len(ch.early) < maxEarly {
			ch.early = append(ch.early, m)
		} else {
			ch.reread.Store(true)
		}
		return
	}
	h.liveLocked(ch, m)
}

func (h *Hub) liveLocked(ch *hubChannel, m liveMsg) {
	switch {
	case ch.pos == Position{Epoch: noEpoch} && m.pos.Offset == 1:
		// The first event of the channel's history.
		ch.pos = m.pos
		h.deliverLocked(ch, m.pos, m.ev)
	case m.pos.Epoch != ch.pos.Epoch || m.pos.Offset > ch.pos.Offset+1:
		// Another epoch, or a skipped position: the stream decides.
		ch.reread.Store(true)
		signal(ch.conn.kick)
	case m.pos.Offset == ch.pos.Offset+1:
		ch.pos = m.pos
		h.deliverLocked(ch, m.pos, m.ev)
	}
	// An offset at or below pos was delivered already (a re-read got it).
}

// deliverLocked queues one event to every stream of ch past its cursor.
// Events of a user channel end that user's streams instead.
func (h *Hub) deliverLocked(ch *hubChannel, pos Position, ev *encodedEvent) {
	var n int64
	for cl, s := range ch.subs {
		if pos.Offset <= s.cursor {
			continue
		}
		s.cursor = pos.Offset
		if ch.internal {
			cl.end(endDisconnected)
			continue
		}
		if cl.enqueue(queued{idx: s.idx, pos: pos, ev: ev}) {
			n++
		}
	}
	h.observeDelivered(n)
}

// observeDelivered reports n events queued or replayed to clients, as one
// observation: one per fan-out, not one per client.
func (h *Hub) observeDelivered(n int64) {
	if n > 0 {
		h.b.observe(Observation{Kind: ObsDeliver, N: n})
	}
}

// resetLocked moves every stream of ch to pos with a reset event: what
// they missed cannot be delivered.
func (h *Hub) resetLocked(ch *hubChannel, pos Position) {
	ch.pos = pos
	for cl, s := range ch.subs {
		s.cursor = pos.Offset
		if !ch.internal {
			cl.enqueue(queued{idx: s.idx, pos: pos, reset: true})
		}
	}
}

// reread brings ch up to date from Redis: its first position (sync), or
// every event after the last one delivered, paging through the stream. A
// history that no longer reaches back, or a new epoch, resets the
// channel's streams.
func (h *Hub) reread(ch *hubChannel) error {
	ch.mu.Lock()
	synced := ch.synced
	ch.mu.Unlock()
	if !synced {
		pos, err := h.position(ch)
		if err != nil {
			return err
		}
		h.sync(ch, pos)
		return nil
	}
	h.rereads.Add(1)
	for {
		ch.mu.Lock()
		from := ch.pos
		ch.mu.Unlock()
		page, err := h.readPage(context.Background(), ch, from)
		if err != nil {
			return err
		}
		ch.mu.Lock()
		if ch.pos != from { // cannot happen: only this worker moves pos
			ch.mu.Unlock()
			continue
		}
		if page.reset && page.newEpoch && ch.internal {
			// A user channel's new epoch: its events all came after what
			// was lost, and a Disconnect among them must still end
			// streams, so read it from its start. (A room's streams get
			// the reset, then live events.)
			h.resetLocked(ch, Position{Epoch: page.top.Epoch})
			ch.mu.Unlock()
			continue
		}
		if page.reset {
			h.resetLocked(ch, page.top)
			ch.mu.Unlock()
			return nil
		}
		for _, e := range page.events {
			ch.pos = e.pos
			h.deliverLocked(ch, e.pos, e.ev)
		}
		ch.mu.Unlock()
		if !page.more {
			return nil
		}
	}
}

// position returns ch's current position: noEpoch at 0 when the channel
// has no history (never published to, or lost). It writes nothing, so
// streams to channels nobody publishes to leave no key behind.
func (h *Hub) position(ch *hubChannel) (Position, error) {
	return parseMeta(h.b.Do(context.Background(), ch.keys.meta, h.metaCmd(ch)))
}

func (h *Hub) metaCmd(ch *hubChannel) rueidis.Completed {
	return h.b.client.B().Hmget().Key(ch.keys.meta).Field("e", "s").Build()
}

// sync gives ch its first position, delivers what arrived before it, and
// lets the streams waiting for it start.
func (h *Hub) sync(ch *hubChannel, pos Position) {
	ch.mu.Lock()
	ch.synced = true
	ch.pos = pos
	early := ch.early
	ch.early = nil
	for _, m := range early {
		h.liveLocked(ch, m)
	}
	ch.mu.Unlock()
	close(ch.ready)
}

// syncBatch bounds the positions one pipelined read fetches.
const syncBatch = 256

// syncAll gives channels that have none their first position, a pipeline
// per syncBatch channels (a connection's channels share a node), so a
// reconnect storm over many new channels does not queue them one round
// trip each. false when some read failed (those stay marked).
func (h *Hub) syncAll(chans []*hubChannel) bool {
	ok := true
	for len(chans) > 0 {
		batch := chans[:min(syncBatch, len(chans))]
		chans = chans[len(batch):]
		cmds := make([]rueidis.Completed, len(batch))
		for i, ch := range batch {
			cmds[i] = h.metaCmd(ch)
		}
		for i, res := range h.b.DoMulti(context.Background(), batch[0].keys.meta, cmds...) {
			pos, err := parseMeta(res)
			if err != nil {
				batch[i].reread.Store(true)
				ok = false
				continue
			}
			h.sync(batch[i], pos)
		}
	}
	return ok
}

// parseMeta reads a channel's HMGET e s: its position, or noEpoch when it
// has no history.
func parseMeta(res rueidis.RedisResult) (Position, error) {
	vals, err := res.ToArray()
	if err == nil && len(vals) != 2 {
		err = errors.New("unexpected reply")
	}
	if err != nil {
		return Position{}, fmt.Errorf("realtime: position: %w", err)
	}
	epoch, eerr := vals[0].ToString()
	last, serr := vals[1].AsInt64()
	if eerr != nil || serr != nil || !validEpoch(epoch) {
		return Position{Epoch: noEpoch}, nil
	}
	return Position{Offset: uint64(max(last, 0)), Epoch: epoch}, nil
}

// streamEvent is one event read from a stream.
type streamEvent struct {
	pos Position
	ev  *encodedEvent
}

// streamPage is one read of a stream after a position.
type streamPage struct {
	events []streamEvent
	more   bool // a full page: read again
	reset  bool // the history no longer reaches back: reset to top
	// newEpoch: the reset is the channel's epoch changing (or its history
	// lost): the new epoch can be read from its start.
	newEpoch bool
	top      Position // the channel's current position (with reset)
}

// readPage reads up to ReplayPage events after from, with the channel's
// epoch and last offset in the same round trip.
func (h *Hub) readPage(ctx context.Context, ch *hubChannel, from Position) (streamPage, error) {
	client := h.b.client
	res := h.b.DoMulti(ctx, ch.keys.meta,
		client.B().Hmget().Key(ch.keys.meta).Field("e", "s").Build(),
		client.B().Xrange().Key(ch.keys.stream).Start(strconv.FormatUint(from.Offset+1, 10)+"-0").End("+").Count(int64(h.page)).Build(),
	)
	meta, err := res[0].ToArray()
	if err != nil {
		return streamPage{}, fmt.Errorf("realtime: read: %w", err)
	}
	epoch, eerr := meta[0].ToString()
	last, serr := meta[1].AsInt64()
	if eerr != nil || serr != nil || !validEpoch(epoch) {
		// No meta: no history (any more).
		top := Position{Epoch: noEpoch}
		if from == top {
			return streamPage{top: top}, nil
		}
		return streamPage{reset: true, newEpoch: true, top: top}, nil
	}
	top := Position{Offset: uint64(max(last, 0)), Epoch: epoch}
	if from.Epoch == noEpoch && from.Offset == 0 {
		// The channel had no history: its epoch's events all came after.
		from.Epoch = epoch
	}
	if epoch != from.Epoch {
		return streamPage{reset: true, newEpoch: true, top: top}, nil
	}
	if top.Offset < from.Offset {
		return streamPage{reset: true, top: top}, nil
	}
	entries, err := res[1].AsXRange()
	if err != nil && !rueidis.IsRedisNil(err) {
		return streamPage{}, fmt.Errorf("realtime: read: %w", err)
	}
	page := streamPage{top: top, more: len(entries) == h.page}
	next := from.Offset + 1
	for _, e := range entries {
		off, ok := entryOffset(e.ID)
		if !ok || off != next {
			// A hole: trimmed or expired past from.
			return streamPage{reset: true, top: top}, nil
		}
		next++
		var ev *encodedEvent
		if !ch.internal {
			ev = encodeEvent(e.FieldValues["e"], []byte(e.FieldValues["d"]))
		}
		page.events = append(page.events, streamEvent{pos: Position{Offset: off, Epoch: epoch}, ev: ev})
	}
	if len(entries) == 0 && top.Offset > from.Offset {
		return streamPage{reset: true, top: top}, nil // expired or deleted
	}
	return page, nil
}

func entryOffset(id string) (uint64, bool) {
	ms, seq, ok := strings.Cut(id, "-")
	if !ok || seq != "0" {
		return 0, false
	}
	off, err := strconv.ParseUint(ms, 10, 64)
	return off, err == nil
}

// Stream is one client's SSE stream, for Hub.Serve.
type Stream struct {
	// Channels are the channels to stream, at most MaxChannels, each a
	// valid name (see ErrInvalidChannel). Required.
	Channels []string
	// UserID is the stream's user, "" for an anonymous stream. It shows in
	// presence, and Disconnect(UserID) ends the stream. At most
	// MaxUserIDLength bytes.
	UserID string
	// LastEventID is the position to resume from: the stream ID of the last
	// event the client received (see the format above appendStreamID).
	// Empty, malformed or foreign means: start live.
	LastEventID string
	// Alive, when set, is asked every AliveInterval whether the stream may
	// go on (its session still exists, say); false ends it with a last
	// "disconnect" event of reason "session". An error keeps the stream.
	Alive func(ctx context.Context) (bool, error)
	// AliveInterval is how often Alive is asked. Default:
	// DefaultAliveInterval (30 s).
	AliveInterval time.Duration
	// Heartbeat is the interval of the comment lines that keep proxies and
	// the browser from timing the stream out. Default: DefaultHeartbeat
	// (15 s).
	Heartbeat time.Duration
	// Retry is the reconnect delay hinted to the browser ("retry:").
	// Default: DefaultRetry (3 s).
	Retry time.Duration
	// ResetEvent names the event sent when a channel's history no longer
	// reaches back to the client's position. Default: DefaultResetEvent
	// ("reset").
	ResetEvent string
	// MaxChannels bounds Channels, at most 64 (a stream ID holds at most
	// that many positions). Default: DefaultMaxChannels (16).
	MaxChannels int
	// OnStart, when set, is called once the stream is live on every channel
	// (after any replay), from the handler's goroutine.
	OnStart func(StreamStart)
}

// StreamStart tells Stream.OnStart how a stream started.
type StreamStart struct {
	// ConnID is the connection's ID, as in presence.
	ConnID string
	// Resumed is true when at least one channel resumed from the client's
	// position.
	Resumed bool
	// Channels are the stream's channels, in order.
	Channels []ChannelStart
}

// ChannelStart is how one channel of a stream started.
type ChannelStart struct {
	// Channel is the channel's name.
	Channel string
	// Resumed is true when the client's position named this channel (the
	// events it missed were replayed, or Reset is true).
	Resumed bool
	// Reset is true when the client's position no longer reached back (or
	// its epoch was lost): a reset event was sent for the channel.
	Reset bool
	// Position is where the channel went live.
	Position Position
}

// endReason is why the server ended a stream, sent in its last event.
type endReason string

const (
	endSlow         endReason = "slow"
	endDisconnected endReason = "disconnected"
	endSession      endReason = "session"
	endShutdown     endReason = "shutdown"
)

// queued is one item of a client's live queue: an event or a reset of
// channel idx, at pos.
type queued struct {
	idx   int
	pos   Position
	ev    *encodedEvent
	reset bool
}

// sseClient is one open stream.
type sseClient struct {
	h      *Hub
	id     string
	user   string
	since  time.Time
	chans  []*hubChannel
	hashes []string
	ctl    *hubChannel // the user channel, nil when anonymous
	rc     *http.ResponseController

	notify chan struct{}
	done   chan struct{}

	mu     sync.Mutex
	q      []queued
	qbytes int
	ended  bool
	reason endReason
	active bool // the handler may write: deadlines may be set
	dlAt   time.Time
}

// enqueue adds one item to the live queue without blocking; a full queue
// ends the stream as slow. It reports whether it queued an event (counted
// as delivered).
func (c *sseClient) enqueue(it queued) bool {
	size := 64
	if it.ev != nil {
		size = it.ev.size()
	}
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return false
	}
	// An empty queue takes any one event: its SSE encoding ("data: " per
	// line) can be several times MaxEventSize, which ClientQueueBytes
	// need only hold once.
	if len(c.q) >= c.h.cfg.ClientQueueEvents || (len(c.q) > 0 && c.qbytes+size > c.h.cfg.ClientQueueBytes) {
		// Ended under the same lock that saw the queue full: two channels
		// delivering at once drop (and count) the client once.
		c.endLocked(endSlow)
		c.mu.Unlock()
		c.h.droppedSlow.Add(1)
		c.h.b.observe(Observation{Kind: ObsDropSlow, N: 1})
		return false
	}
	c.q = append(c.q, it)
	c.qbytes += size
	c.mu.Unlock()
	if it.ev != nil {
		c.h.delivered.Add(1)
	}
	signal(c.notify)
	return it.ev != nil
}

// end asks the handler to end the stream with reason. A write in progress
// gets kickGrace to finish, so a client that stopped reading cannot hold
// the handler.
func (c *sseClient) end(reason endReason) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.endLocked(reason)
}

// endLocked is end with c.mu held.
func (c *sseClient) endLocked(reason endReason) {
	if c.ended {
		return
	}
	c.ended = true
	c.reason = reason
	close(c.done)
	if c.active {
		_ = c.rc.SetWriteDeadline(time.Now().Add(kickGrace))
	}
}

// take empties the live queue.
func (c *sseClient) take(buf []queued) []queued {
	c.mu.Lock()
	buf = append(buf[:0], c.q...)
	clear(c.q)
	c.q = c.q[:0]
	if cap(c.q) > 64 {
		c.q = nil // a burst's queue does not stay allocated
	}
	c.qbytes = 0
	c.mu.Unlock()
	return buf
}

// writeDeadline sets the deadline of the next write, unless the stream is
// ending (end set a short one). It renews at most every few seconds.
func (c *sseClient) writeDeadline() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return
	}
	now := time.Now()
	if now.Sub(c.dlAt) < 5*time.Second {
		return
	}
	c.dlAt = now
	_ = c.rc.SetWriteDeadline(now.Add(streamWriteTimeout))
}

// sseWriter writes one stream's SSE text.
type sseWriter struct {
	c     *sseClient
	w     http.ResponseWriter
	buf   []byte
	pos   []Position // the client's position on each channel
	items []queued   // reused by writeQueued

	resetName string
}

func (sw *sseWriter) event(idx int, pos Position, ev *encodedEvent) {
	sw.pos[idx] = pos
	sw.buf = append(sw.buf, ev.head...)
	sw.buf = sw.idLine(sw.buf)
	sw.buf = append(sw.buf, ev.body...)
}

func (sw *sseWriter) idLine(b []byte) []byte {
	b = append(b, "id: "...)
	b = appendStreamID(b, sw.c.hashes, sw.pos)
	return append(b, '\n')
}

// reset writes a reset event for the channels idx (moved to their
// positions in pos already).
func (sw *sseWriter) reset(name string, idx ...int) {
	names := make([]string, len(idx))
	for i, j := range idx {
		names[i] = sw.c.chans[j].name
	}
	data, _ := json.Marshal(map[string][]string{"channels": names})
	sw.buf = append(sw.buf, "event: "...)
	sw.buf = append(sw.buf, name...)
	sw.buf = append(sw.buf, '\n')
	sw.buf = sw.idLine(sw.buf)
	sw.buf = append(sw.buf, "data: "...)
	sw.buf = append(sw.buf, data...)
	sw.buf = append(sw.buf, "\n\n"...)
	sw.c.h.resets.Add(1)
	sw.c.h.b.observe(Observation{Kind: ObsReset, N: 1})
}

// flush writes what is buffered.
func (sw *sseWriter) flush() error {
	if len(sw.buf) == 0 {
		return nil
	}
	sw.c.writeDeadline()
	_, err := sw.w.Write(sw.buf)
	if err == nil {
		err = sw.c.rc.Flush()
	}
	if cap(sw.buf) > 4<<10 {
		sw.buf = nil // an idle stream keeps no copy of a large event
	} else {
		sw.buf = sw.buf[:0]
	}
	return err
}

func (s *Stream) fill() error {
	if s.MaxChannels < 0 || s.Heartbeat < 0 || s.Retry < 0 || s.AliveInterval < 0 {
		return errors.New("realtime: negative stream option")
	}
	if s.MaxChannels == 0 {
		s.MaxChannels = DefaultMaxChannels
	}
	if s.MaxChannels > maxStreamIDEntries {
		// A stream ID holds at most that many positions.
		return fmt.Errorf("realtime: MaxChannels must be at most %d", maxStreamIDEntries)
	}
	if s.Heartbeat == 0 {
		s.Heartbeat = DefaultHeartbeat
	}
	if s.Retry == 0 {
		s.Retry = DefaultRetry
	}
	if s.AliveInterval == 0 {
		s.AliveInterval = DefaultAliveInterval
	}
	if s.ResetEvent == "" {
		s.ResetEvent = DefaultResetEvent
	}
	if len(s.ResetEvent) > MaxEventNameLength || hasControl(s.ResetEvent) {
		return ErrInvalidEvent
	}
	if len(s.Channels) == 0 {
		return ErrInvalidChannel
	}
	if len(s.Channels) > s.MaxChannels {
		return ErrTooManyChannels
	}
	seen := make(map[string]bool, len(s.Channels))
	for _, name := range s.Channels {
		if !validChannel(name) || seen[name] {
			return ErrInvalidChannel
		}
		seen[name] = true
	}
	if len(s.UserID) > MaxUserIDLength || hasControl(s.UserID) {
		return fmt.Errorf("realtime: invalid user ID")
	}
	return nil
}

// Serve streams s to w as Server-Sent Events until the client leaves, the
// stream is ended (Disconnect, Alive, falling behind, Shutdown) or the
// hub shuts down. It returns an error only before it wrote anything:
// ErrInvalidChannel or ErrTooManyChannels (answer 400), ErrHubClosed,
// ErrHubFull or ErrRealtimeUnavailable (answer 503); once the stream
// started it returns nil.
//
// The stream clears the connection's read and write deadlines (so a
// server's ReadTimeout or WriteTimeout does not cut it) and bounds each of
// its writes by itself instead. It replays what the client's position says
// it missed, paced by the client's writes, then goes live.
func (h *Hub) Serve(w http.ResponseWriter, r *http.Request, s Stream) error {
	// The set-up runs in its own call, whose deep frames are gone once the
	// stream is live: the GC can then shrink an idle stream's goroutine
	// stack back to its minimum.
	// open sets c as soon as the stream is registered: a panic after
	// that (in OnStart, say) still unregisters it.
	var c *sseClient
	defer func() {
		if c != nil {
			h.leave(c)
		}
	}()
	sw, err := h.open(w, r, &s, &c)
	if err != nil || sw == nil {
		return err
	}
	h.stream(r.Context(), sw, &s)
	return nil
}

// open registers the stream, joins its channels, writes its headers and
// replays what the client missed. It sets *reg once the stream is
// registered (Serve then unregisters it, even after a panic); sw is nil
// when the stream ended during its start.
func (h *Hub) open(w http.ResponseWriter, r *http.Request, s *Stream, reg **sseClient) (sw *sseWriter, err error) {
	if err := s.fill(); err != nil {
		return nil, err
	}
	for _, name := range s.Channels {
		if h.b.breaker.State(h.b.scope(h.keysOf(name).stream)) == BreakerOpen {
			return nil, ErrRealtimeUnavailable
		}
	}
	c := &sseClient{
		h: h, id: randomBase62(16), user: s.UserID, since: h.b.clock.Now(),
		rc:     http.NewResponseController(w),
		notify: make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
	h.mu.Lock()
	switch {
	case h.closed:
		h.mu.Unlock()
		return nil, ErrHubClosed
	case len(h.clients) >= h.cfg.MaxConnections:
		h.mu.Unlock()
		return nil, ErrHubFull
	}
	*reg = c
	h.clients[c] = struct{}{}
	h.connections.Add(1)
	h.streams.Add(1)
	h.mu.Unlock()
	h.b.observe(Observation{Kind: ObsStreamOpen, N: 1})

	// Join every channel (subscribing where this instance is new to it)
	// and wait for their positions.
	for _, name := range s.Channels {
		ch, err := h.acquire(name, false)
		if err != nil {
			return nil, err
		}
		c.chans = append(c.chans, ch)
		c.hashes = append(c.hashes, channelHash(name))
	}
	if s.UserID != "" {
		ch, err := h.acquire(userChannel(s.UserID), true)
		if err != nil {
			return nil, err
		}
		c.ctl = ch
	}
	wctx, cancel := context.WithTimeout(r.Context(), 2*h.b.timeout)
	for _, ch := range c.all() {
		select {
		case <-ch.ready:
		case <-wctx.Done():
		}
	}
	cancel()
	for _, ch := range c.all() {
		select {
		case <-ch.ready:
		default:
			return nil, ErrRealtimeUnavailable
		}
	}

	// Plan each channel from the client's position.
	sw = &sseWriter{c: c, w: w, pos: make([]Position, len(c.chans)), resetName: s.ResetEvent}
	from := map[string]Position{}
	if entries, ok := decodeStreamID(s.LastEventID); ok {
		for _, e := range entries {
			if _, dup := from[e.hash]; !dup {
				from[e.hash] = e.pos
			}
		}
	}
	hashCount := map[string]int{}
	for _, hs := range c.hashes {
		hashCount[hs]++
	}
	start := StreamStart{ConnID: c.id, Channels: make([]ChannelStart, len(c.chans))}
	var replay, resets []int
	var resetFrom []Position // the client's positions of the resets channels
	for i, ch := range c.chans {
		p, ok := from[c.hashes[i]]
		ok = ok && hashCount[c.hashes[i]] == 1
		// A position ahead of this instance is asked about before taking
		// the channel's lock: a Redis read must not hold deliveries.
		ahead := false
		if ok {
			ch.mu.Lock()
			cur := ch.pos
			ch.mu.Unlock()
			ahead = (p.Epoch == cur.Epoch || cur == Position{Epoch: noEpoch}) && p.Offset > cur.Offset && h.reached(r.Context(), ch, p)
		}
		ch.mu.Lock()
		cur := ch.pos
		switch {
		case ahead && (p.Epoch == cur.Epoch || cur == Position{Epoch: noEpoch}) && p.Offset >= cur.Offset:
			// Ahead of this instance, which has not delivered what the
			// client got elsewhere yet (maybe not even the first events
			// of the channel's history): live, past the client's position.
			cur = p
			ch.subs[c] = &chanSub{idx: i, cursor: p.Offset}
			start.Channels[i].Resumed = true
		case !ok || (p.Epoch == cur.Epoch && p.Offset > cur.Offset):
			// Absent or foreign (beyond the channel's last event): live.
			ch.subs[c] = &chanSub{idx: i, cursor: cur.Offset}
		case p == cur:
			ch.subs[c] = &chanSub{idx: i, cursor: cur.Offset}
			start.Channels[i].Resumed = true
		case p.Epoch == cur.Epoch, p == Position{Epoch: noEpoch}:
			// Behind (or from before the channel had a history, which
			// its epoch's events all follow): replay.
			cur = p
			replay = append(replay, i)
			start.Channels[i].Resumed = true
		default:
			ch.subs[c] = &chanSub{idx: i, cursor: cur.Offset}
			resets = append(resets, i)
			resetFrom = append(resetFrom, p)
			start.Channels[i].Resumed, start.Channels[i].Reset = true, true
		}
		ch.mu.Unlock()
		sw.pos[i] = cur
		start.Channels[i].Channel = ch.name
		start.Resumed = start.Resumed || start.Channels[i].Resumed
	}
	if c.ctl != nil {
		c.ctl.mu.Lock()
		c.ctl.subs[c] = &chanSub{idx: -1, cursor: c.ctl.pos.Offset}
		c.ctl.mu.Unlock()
	}
	if start.Resumed {
		h.resumes.Add(1)
		h.b.observe(Observation{Kind: ObsResume, N: 1})
	}
	h.presence.join(h, c)

	// The stream starts: headers, deadlines, the retry hint.
	hd := w.Header()
	hd.Set("Content-Type", "text/event-stream")
	hd.Set("Cache-Control", "no-cache")
	hd.Set("X-Accel-Buffering", "no")
	if r.ProtoMajor == 1 {
		hd.Set("Connection", "keep-alive")
	}
	w.WriteHeader(http.StatusOK)
	_ = c.rc.SetReadDeadline(time.Time{})
	c.mu.Lock()
	c.active = true
	if c.ended {
		_ = c.rc.SetWriteDeadline(time.Now().Add(kickGrace))
	}
	c.mu.Unlock()
	// The first block carries the stream's start position as its id (a
	// browser records an id even without data), so a client that loses
	// the stream before its first event still resumes from where it
	// started. A channel about to be reset keeps the client's own
	// position there: were the reset lost, the next start resets again.
	sw.buf = append(sw.buf, "retry: "...)
	sw.buf = strconv.AppendInt(sw.buf, s.Retry.Milliseconds(), 10)
	sw.buf = append(sw.buf, '\n')
	for j, i := range resets {
		sw.pos[i], resetFrom[j] = resetFrom[j], sw.pos[i]
	}
	sw.buf = sw.idLine(sw.buf)
	for j, i := range resets {
		sw.pos[i], resetFrom[j] = resetFrom[j], sw.pos[i]
	}
	sw.buf = append(sw.buf, ": connected\n\n"...)
	if len(resets) > 0 {
		sw.reset(s.ResetEvent, resets...)
	}
	if sw.flush() != nil {
		return nil, nil
	}
	for _, i := range replay {
		reset, ok := h.replay(r.Context(), sw, i)
		if !ok {
			select {
			case <-c.done: // ended by the server: it still says why
				sw.writeLast()
			default:
			}
			return nil, nil
		}
		start.Channels[i].Reset = start.Channels[i].Reset || reset
	}
	for i := range start.Channels {
		start.Channels[i].Position = sw.pos[i]
	}
	if s.OnStart != nil {
		s.OnStart(start)
	}
	return sw, nil
}

// reached reports whether channel ch has published up to p (its epoch
// and last offset in Redis): a position ahead of this instance is then
// genuine, not foreign. One short Redis read.
func (h *Hub) reached(ctx context.Context, ch *hubChannel, p Position) bool {
	vals, err := h.b.Do(ctx, ch.keys.meta, h.b.client.B().Hmget().Key(ch.keys.meta).Field("e", "s").Build()).ToArray()
	if err != nil || len(vals) != 2 {
		return false
	}
	epoch, _ := vals[0].ToString()
	last, err := vals[1].AsInt64()
	return err == nil && epoch == p.Epoch && last >= 0 && uint64(last) >= p.Offset
}

func (c *sseClient) all() []*hubChannel {
	if c.ctl == nil {
		return c.chans
	}
	return append(c.chans[:len(c.chans):len(c.chans)], c.ctl)
}

// replay writes channel i's events after the client's position, a page
// at a time (each written before the next is read), then joins it live
// exactly where the replay ended. reset tells whether the history no
// longer reached back. ok is false when the stream must end.
func (h *Hub) replay(ctx context.Context, sw *sseWriter, i int) (reset, ok bool) {
	c, ch := sw.c, sw.c.chans[i]
	for {
		page, err := h.readPage(ctx, ch, sw.pos[i])
		if err != nil {
			h.b.log.Error("realtime: replay failed, ending the stream", err)
			return reset, false
		}
		if page.reset {
			sw.pos[i] = page.top
			sw.reset(sw.resetName, i)
			reset = true
		}
		for j, e := range page.events {
			sw.event(i, e.pos, e.ev)
			h.delivered.Add(1)
			if len(sw.buf) >= replayFlush && sw.flush() != nil {
				h.observeDelivered(int64(j + 1))
				return reset, false
			}
		}
		h.observeDelivered(int64(len(page.events)))
		if !h.writeQueued(sw) || sw.flush() != nil {
			return reset, false
		}
		if page.more {
			continue
		}
		ch.mu.Lock()
		cur := ch.pos
		switch {
		case cur.Epoch == sw.pos[i].Epoch && cur.Offset <= sw.pos[i].Offset:
			ch.subs[c] = &chanSub{idx: i, cursor: sw.pos[i].Offset}
		case cur.Epoch == sw.pos[i].Epoch:
			ch.mu.Unlock()
			continue // delivered live meanwhile: read on
		default:
			// The hub and the stream disagree on the epoch for a moment
			// (a re-read is under way): go with the hub's, never silently.
			ch.subs[c] = &chanSub{idx: i, cursor: cur.Offset}
			sw.pos[i] = cur
			sw.reset(sw.resetName, i)
			reset = true
		}
		ch.mu.Unlock()
		return reset, sw.flush() == nil
	}
}

// writeQueued buffers the live queue's items; false when the stream must
// end (its client was ended).
func (h *Hub) writeQueued(sw *sseWriter) bool {
	select {
	case <-sw.c.done:
		return false
	default:
	}
	sw.items = sw.c.take(sw.items)
	sw.buffer(sw.items)
	clear(sw.items) // an idle stream holds no event
	return true
}

// buffer writes queued items into the buffer, a reset (of every channel
// reset in a row) before the events that follow it.
func (sw *sseWriter) buffer(items []queued) {
	var resets []int
	for _, it := range items {
		if it.reset {
			sw.pos[it.idx] = it.pos
			resets = append(resets, it.idx)
			continue
		}
		if len(resets) > 0 {
			sw.reset(sw.resetName, resets...)
			resets = resets[:0]
		}
		sw.event(it.idx, it.pos, it.ev)
	}
	if len(resets) > 0 {
		sw.reset(sw.resetName, resets...)
	}
}

// stream is the live loop: queued events, heartbeats, Alive checks, the
// end.
func (h *Hub) stream(ctx context.Context, sw *sseWriter, s *Stream) {
	c := sw.c
	hb := time.NewTicker(s.Heartbeat)
	defer hb.Stop()
	var aliveC <-chan time.Time
	if s.Alive != nil {
		t := time.NewTicker(s.AliveInterval)
		defer t.Stop()
		aliveC = t.C
	}
	for {
		select {
		case <-c.notify:
			if !h.writeQueued(sw) {
				continue // done: the next round writes the last event
			}
			if sw.flush() != nil {
				return
			}
		case <-hb.C:
			sw.buf = append(sw.buf, ": hb\n\n"...)
			if sw.flush() != nil {
				return
			}
		case <-aliveC:
			actx, cancel := context.WithTimeout(ctx, h.b.timeout)
			ok, err := s.Alive(actx)
			cancel()
			if err == nil && !ok {
				c.end(endSession)
			}
		case <-c.done:
			sw.writeLast()
			return
		case <-ctx.Done():
			return
		}
	}
}

// writeLast writes the last event of a stream the server ended (and what
// was queued before the end, unless it fell behind), under end's short
// write deadline.
func (sw *sseWriter) writeLast() {
	c := sw.c
	c.mu.Lock()
	reason := c.reason
	var items []queued
	if reason != endSlow {
		// What was queued before the end is still delivered.
		items = c.q
	}
	c.q = nil
	c.mu.Unlock()
	sw.buffer(items)
	sw.buf = append(sw.buf, "event: disconnect\n"...)
	sw.buf = sw.idLine(sw.buf)
	sw.buf = append(sw.buf, `data: {"reason":"`...)
	sw.buf = append(sw.buf, reason...)
	sw.buf = append(sw.buf, "\"}\n\n"...)
	_, _ = sw.w.Write(sw.buf)
	_ = c.rc.Flush()
}

// leave unregisters an ended stream.
func (h *Hub) leave(c *sseClient) {
	c.mu.Lock()
	c.active = false
	if !c.ended {
		c.ended = true
		close(c.done)
	}
	c.q = nil
	c.mu.Unlock()
	for _, ch := range c.all() {
		ch.mu.Lock()
		delete(ch.subs, c)
		ch.mu.Unlock()
		h.release(ch)
	}
	h.presence.leave(h, c)
	h.mu.Lock()
	delete(h.clients, c)
	h.mu.Unlock()
	h.connections.Add(-1)
	h.b.observe(Observation{Kind: ObsStreamClose, N: 1})
	h.streams.Done()
}

// presenceAddScript refreshes presence entries.
//
// KEYS[1] the channel's presence sorted set (member "<instance>|<conn
// ID>|<since ms>|<user ID>", score its expiry in Redis TIME ms). ARGV[1]
// PresenceTTL ms, ARGV[2..] the members. Expired members are pruned.
var presenceAddScript = newPipelinedScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exp = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], exp, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
`)

// presenceReadScript prunes expired members and returns {count, members}.
//
// KEYS[1] the presence sorted set. ARGV[1] the most members to return.
var presenceReadScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
return {n, redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)}
`)

// presenceBatch bounds the members of one presence script call.
const presenceBatch = 256

// presenceState is the instance's side of presence: leaves to write.
type presenceState struct {
	mu   sync.Mutex
	gone map[string][]string // presence key → members to remove
	kick chan struct{}
}

func (p *presenceState) init() {
	p.gone = map[string][]string{}
	p.kick = make(chan struct{}, 1)
}

func (c *sseClient) presenceMember() string {
	return c.h.cfg.Instance + "|" + c.id + "|" + strconv.FormatInt(c.since.UnixMilli(), 10) + "|" + c.user
}

// join writes c's presence entries at once (one pipelined round trip), so
// Presence shows the stream when it starts. A failure is logged; the
// next refresh retries.
func (p *presenceState) join(h *Hub, c *sseClient) {
	m := c.presenceMember()
	ttl := strconv.FormatInt(h.cfg.PresenceTTL.Milliseconds(), 10)
	byScope := map[string][]rueidis.LuaExec{}
	for _, ch := range c.chans {
		sc := h.b.scope(ch.keys.presence)
		byScope[sc] = append(byScope[sc], rueidis.LuaExec{Keys: []string{ch.keys.presence}, Args: []string{ttl, m}})
	}
	h.execByScope(byScope)
}

// leave queues c's entries for removal by the presence loop.
func (p *presenceState) leave(h *Hub, c *sseClient) {
	if len(c.chans) == 0 {
		return
	}
	m := c.presenceMember()
	p.mu.Lock()
	for _, ch := range c.chans {
		p.gone[ch.keys.presence] = append(p.gone[ch.keys.presence], m)
	}
	p.mu.Unlock()
	signal(p.kick)
}

// execByScope runs presence scripts, one pipeline per node, concurrently.
func (h *Hub) execByScope(byScope map[string][]rueidis.LuaExec) {
	var wg sync.WaitGroup
	for _, execs := range byScope {
		wg.Add(1)
		go func(execs []rueidis.LuaExec) {
			defer wg.Done()
			res := h.b.ExecMulti(context.Background(), execs[0].Keys[0], presenceAddScript, execs...)
			if _, err := multiErr(res); err != nil {
				h.b.log.Error("realtime: presence refresh failed", err)
			}
		}(execs)
	}
	wg.Wait()
}

// presenceLoop refreshes the local streams' presence entries every
// PresenceInterval and writes leaves as they come (coalesced).
func (h *Hub) presenceLoop() {
	defer h.loops.Done()
	t := time.NewTicker(h.cfg.PresenceInterval)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			h.flushLeaves()
			return
		case <-h.presence.kick:
			h.flushLeaves()
		case <-t.C:
			h.flushLeaves()
			h.refreshPresence()
		}
	}
}

func (h *Hub) refreshPresence() {
	members := map[string][]string{}
	h.mu.Lock()
	for c := range h.clients {
		c.mu.Lock()
		live := c.active && !c.ended
		c.mu.Unlock()
		if !live {
			continue
		}
		m := c.presenceMember()
		for _, ch := range c.chans {
			members[ch.keys.presence] = append(members[ch.keys.presence], m)
		}
	}
	h.mu.Unlock()
	ttl := strconv.FormatInt(h.cfg.PresenceTTL.Milliseconds(), 10)
	byScope := map[string][]rueidis.LuaExec{}
	for key, ms := range members {
		sc := h.b.scope(key)
		for len(ms) > 0 {
			n := min(presenceBatch, len(ms))
			args := append([]string{ttl}, ms[:n]...)
			byScope[sc] = append(byScope[sc], rueidis.LuaExec{Keys: []string{key}, Args: args})
			ms = ms[n:]
		}
	}
	h.execByScope(byScope)
}

func (h *Hub) flushLeaves() {
	h.presence.mu.Lock()
	gone := h.presence.gone
	h.presence.gone = map[string][]string{}
	h.presence.mu.Unlock()
	if len(gone) == 0 {
		return
	}
	byScope := map[string][]rueidis.Completed{}
	var first = map[string]string{}
	for key, ms := range gone {
		sc := h.b.scope(key)
		for len(ms) > 0 {
			n := min(presenceBatch, len(ms))
			byScope[sc] = append(byScope[sc], h.b.client.B().Zrem().Key(key).Member(ms[:n]...).Build())
			ms = ms[n:]
		}
		first[sc] = key
	}
	var wg sync.WaitGroup
	for sc, cmds := range byScope {
		wg.Add(1)
		go func(key string, cmds []rueidis.Completed) {
			defer wg.Done()
			for _, r := range h.b.DoMulti(context.Background(), key, cmds...) {
				if err := r.Error(); err != nil {
					h.b.log.Error("realtime: presence leave failed", err)
					return
				}
			}
		}(first[sc], cmds)
	}
	wg.Wait()
}

// Presence returns who is connected to channel across instances: the
// count of live connections and at most limit of them (100 when limit is
// not positive), sorted oldest first; when there are more, which ones is
// unspecified. One Redis call, which also prunes entries whose instance
// stopped refreshing them.
func (h *Hub) Presence(ctx context.Context, channel string, limit int) (PresenceInfo, error) {
	if !validChannel(channel) {
		return PresenceInfo{}, ErrInvalidChannel
	}
	if limit <= 0 {
		limit = 100
	}
	limit = min(limit, 10_000)
	k := h.keysOf(channel)
	arr, err := h.b.Exec(ctx, presenceReadScript, []string{k.presence}, []string{strconv.Itoa(limit)}).ToArray()
	if err != nil {
		return PresenceInfo{}, fmt.Errorf("realtime: presence: %w", err)
	}
	info := PresenceInfo{Channel: channel, Members: []Member{}}
	if len(arr) != 2 {
		return PresenceInfo{}, errors.New("realtime: presence: unexpected reply")
	}
	n, _ := arr[0].AsInt64()
	info.Count = int(n)
	ms, _ := arr[1].AsStrSlice()
	for _, m := range ms {
		parts := strings.SplitN(m, "|", 4)
		if len(parts) != 4 {
			continue
		}
		since, _ := strconv.ParseInt(parts[2], 10, 64)
		info.Members = append(info.Members, Member{ConnID: parts[1], UserID: parts[3], Instance: parts[0], Since: time.UnixMilli(since).UTC()})
	}
	slices.SortStableFunc(info.Members, func(a, b Member) int { return a.Since.Compare(b.Since) })
	return info, nil
}

// Shutdown ends every stream with a last "disconnect" event of reason
// "shutdown", waits for their handlers, removes their presence entries,
// unsubscribes and stops the hub's goroutines. New streams get
// ErrHubClosed. It returns ctx's error if that ends first (the goroutines
// are stopped all the same). Call it before
// the HTTP server's Shutdown, or register it with
// http.Server.RegisterOnShutdown: open streams otherwise hold the server's
// shutdown until its deadline.
func (h *Hub) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	h.closed = true
	clients := make([]*sseClient, 0, len(h.clients))
	for c := range h.clients {
		clients = append(clients, c)
	}
	h.mu.Unlock()
	for _, c := range clients {
		c.end(endShutdown)
	}
	wait := func(wg *sync.WaitGroup) error {
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	// The loops stop even when ctx ends first: streams that have not ended
	// by then are cut off from Redis, as the server is about to cut them.
	err := wait(&h.streams)
	h.stopOnce.Do(func() { close(h.stop) })
	if err != nil {
		return err
	}
	return wait(&h.loops)
}

// SSEConfig configures the SSE endpoint, the Echo glue over Hub.Serve.
type SSEConfig struct {
	// Hub serves the streams. Required.
	Hub *Hub
	// Channels decides a request's channels. An error answers 400 JSON
	// (an *echo.HTTPError keeps its code and message). Default: the
	// "channels" query parameter, comma-separated.
	Channels func(c echo.Context) ([]string, error)
	// Authorize, when set, runs for each channel before the stream starts:
	// an error answers 403 JSON {"error":"forbidden","channel":...} (an
	// *echo.HTTPError keeps its code and message). Default: nil, every
	// channel allowed.
	Authorize func(c echo.Context, channel string) error
	// UserID names the stream's user, for presence and Hub.Disconnect.
	// Default: the session's user ID when the Session middleware ran
	// (SessionState.UserID), else "".
	UserID func(c echo.Context) string
	// Alive returns the check that ends a stream whose session is gone
	// (nil for none). Default: for a session bound to a user, whether it
	// still exists (SessionStore.Alive). An open stream does not keep its
	// session alive: the check reads it without extending it.
	Alive func(c echo.Context) func(ctx context.Context) (bool, error)
	// AliveInterval is how often Alive's check runs. Default:
	// DefaultAliveInterval (30 s).
	AliveInterval time.Duration
	// MaxChannels bounds a request's channels (400 beyond), at most 64.
	// Default: DefaultMaxChannels (16).
	MaxChannels int
	// Heartbeat is the interval of the keep-alive comments. Default:
	// DefaultHeartbeat (15 s).
	Heartbeat time.Duration
	// Retry is the browser's reconnect delay hint. Default: DefaultRetry
	// (3 s).
	Retry time.Duration
	// ResetEvent names the reset event. Default: DefaultResetEvent
	// ("reset").
	ResetEvent string
	// PositionParam is the query parameter that carries a position when
	// there is no Last-Event-ID header (a page that opens a new
	// EventSource). The header wins. Default: DefaultPositionParam
	// ("lastEventId").
	PositionParam string
	// OnStart, when set, is called once the stream is live (the example
	// announces fresh joins from it). Default: nil.
	OnStart func(c echo.Context, s StreamStart)
}

// SSE returns the SSE handler of hub with the defaults of SSEConfig. With
// channels, every stream gets exactly those; without, the "channels"
// query parameter decides.
func SSE(hub *Hub, channels ...string) echo.HandlerFunc {
	cfg := SSEConfig{Hub: hub}
	if len(channels) > 0 {
		fixed := append([]string(nil), channels...)
		cfg.Channels = func(echo.Context) ([]string, error) { return fixed, nil }
	}
	return SSEWithConfig(cfg)
}

// SSEWithConfig returns the SSE handler for cfg. It panics when cfg is
// invalid; use ToHandler to get the error instead.
func SSEWithConfig(cfg SSEConfig) echo.HandlerFunc {
	return must(cfg.ToHandler())
}

// ToHandler validates cfg, fills its defaults and returns the handler.
func (cfg SSEConfig) ToHandler() (echo.HandlerFunc, error) {
	if cfg.Hub == nil {
		return nil, errors.New("realtime: SSEConfig.Hub is required")
	}
	if cfg.Channels == nil {
		limit := cfg.MaxChannels
		if limit <= 0 {
			limit = DefaultMaxChannels
		}
		cfg.Channels = func(c echo.Context) ([]string, error) { return queryChannels(c, limit) }
	}
	if cfg.UserID == nil {
		cfg.UserID = sessionUserID
	}
	if cfg.Alive == nil {
		cfg.Alive = sessionAlive
	}
	if cfg.PositionParam == "" {
		cfg.PositionParam = DefaultPositionParam
	}
	probe := Stream{Channels: []string{"x"}, MaxChannels: cfg.MaxChannels, Heartbeat: cfg.Heartbeat, Retry: cfg.Retry, AliveInterval: cfg.AliveInterval, ResetEvent: cfg.ResetEvent}
	if err := probe.fill(); err != nil {
		return nil, err
	}
	hub := cfg.Hub
	return func(c echo.Context) error {
		names, err := cfg.Channels(c)
		if err != nil {
			var he *echo.HTTPError
			if errors.As(err, &he) {
				return he
			}
			return c.JSON(http.StatusBadRequest, map[string]string{"error": "invalid channels"})
		}
		s := probe
		s.Channels = names
		if err := s.fill(); err != nil {
			return sseError(c, err)
		}
		if cfg.Authorize != nil {
			for _, name := range names {
				if err := cfg.Authorize(c, name); err != nil {
					var he *echo.HTTPError
					if errors.As(err, &he) {
						return he
					}
					return c.JSON(http.StatusForbidden, map[string]string{"error": "forbidden", "channel": name})
				}
			}
		}
		req := c.Request()
		s.UserID = cfg.UserID(c)
		s.Alive = cfg.Alive(c)
		s.LastEventID = req.Header.Get("Last-Event-ID")
		if s.LastEventID == "" {
			s.LastEventID = c.QueryParam(cfg.PositionParam)
		}
		if cfg.OnStart != nil {
			s.OnStart = func(st StreamStart) { cfg.OnStart(c, st) }
		}
		if err := hub.Serve(c.Response(), req, s); err != nil {
			return sseError(c, err)
		}
		return nil
	}, nil
}

// sseError answers an error Serve returned before the stream started.
func sseError(c echo.Context, err error) error {
	switch {
	case errors.Is(err, ErrInvalidChannel):
		return c.JSON(http.StatusBadRequest, map[string]string{"error": "invalid channel"})
	case errors.Is(err, ErrTooManyChannels):
		return c.JSON(http.StatusBadRequest, map[string]string{"error": "too many channels"})
	case errors.Is(err, ErrHubClosed), errors.Is(err, ErrHubFull), errors.Is(err, ErrRealtimeUnavailable):
		return c.JSON(http.StatusServiceUnavailable, map[string]string{"error": "realtime unavailable"})
	default:
		return c.JSON(http.StatusBadRequest, map[string]string{"error": "invalid stream"})
	}
}

// queryChannels is the default SSEConfig.Channels: ?channels=a,b. It
// splits at most limit+1 names, so a huge list costs no more than that
// (and answers 400).
func queryChannels(c echo.Context, limit int) ([]string, error) {
	q := c.QueryParam("channels")
	if q == "" {
		return nil, ErrInvalidChannel
	}
	return strings.SplitN(q, ",", limit+1), nil
}

func sessionUserID(c echo.Context) string {
	s, err := GetSession(c)
	if err != nil {
		return ""
	}
	return s.UserID()
}

func sessionAlive(c echo.Context) func(ctx context.Context) (bool, error) {
	s, err := GetSession(c)
	if err != nil || s.UserID() == "" {
		return nil
	}
	if s.Store().x != nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.expressAlive() // Express sessions have no handle
	}
	handle, st := s.Handle(), s.Store()
	if handle == "" || st == nil {
		return nil
	}
	return func(ctx context.Context) (bool, error) { return st.Alive(ctx, handle) }
}
