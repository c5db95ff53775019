package redisecho

// Jobs: the guide's "Job Queue with BullMQ", a reliable job queue on Redis.
//
// The Redis logic comes first (Queue: enqueue, the fenced transitions, the
// reaper, the inspector), then the worker (JobHandler, JobMux, Worker),
// then the thin Echo glue (JobInspector).
//
// Keys of queue q, all under one hash tag {jq:q} (so on a cluster a queue
// lives in one slot, and every script may touch every key of its queue):
//
//	P{jq:q}:pending    zset  ready jobs; score (100-priority)*2^40 + sequence
//	P{jq:q}:scheduled  zset  delayed jobs; score = due time (ms, Redis TIME)
//	P{jq:q}:retry      zset  failed attempts waiting for their backoff; score = due
//	P{jq:q}:active     zset  claimed jobs; score = lease deadline (ms)
//	P{jq:q}:done       zset  completed jobs; score = finish time (µs, strictly increasing)
//	P{jq:q}:dead       zset  dead jobs; score = finish time (µs, strictly increasing)
//	P{jq:q}:j:<id>     hash  the job
//	P{jq:q}:u:<digest> str   the holder of a unique key (its ID); PX = UniqueTTL
//	P{jq:q}:marker     zset  wake-ups for blocked workers (BZPOPMIN)
//	P{jq:q}:meta       hash  seq (the sequence), tok (the fencing tokens), paused
//	P{jq:q}:reaper     str   the reaper's lock, PX = ReapInterval
//	Pjq:queues         set   the queue names (another slot: written apart)
//
// Scripts compute the keys of a job (its hash, its unique key) from IDs they
// pop; those keys carry the script's hash tag, so they live in its slot, as
// in BullMQ and asynq.

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"
)

// Defaults of the job queue.
const (
	// DefaultQueueName is QueueConfig.Name's default.
	DefaultQueueName = "default"
	// DefaultMaxPayloadBytes bounds a job's payload: 512 KiB.
	DefaultMaxPayloadBytes = 512 << 10
	// DefaultMaxAttempts is how many times a job runs at most: 3 runs, as
	// BullMQ's attempts.
	DefaultMaxAttempts = 3
	// DefaultJobLease is how long a worker holds a job without renewing
	// it (heartbeats renew it every third of it): 30 s.
	DefaultJobLease = 30 * time.Second
	// DefaultReapInterval is how often one worker returns the jobs whose
	// lease expired: 5 s.
	DefaultReapInterval = 5 * time.Second
	// DefaultStallLimit is how many expired leases send a job to the dead
	// set as stalled: 3.
	DefaultStallLimit = 3
	// DefaultKeepCompleted is how many completed jobs a queue keeps: 1000.
	DefaultKeepCompleted = 1000
	// DefaultKeepCompletedFor is how long a completed job is kept: 24 h.
	DefaultKeepCompletedFor = 24 * time.Hour
	// DefaultKeepDead is how many dead jobs a queue keeps: 10,000.
	DefaultKeepDead = 10000
	// DefaultKeepDeadFor is how long a dead job is kept: 7 days.
	DefaultKeepDeadFor = 7 * 24 * time.Hour
	// DefaultUniqueTTL caps how long a unique key is held: 24 h. A unique
	// key is released when its job completes, dies or is cancelled; the
	// TTL only guards against a job that is lost some other way.
	DefaultUniqueTTL = 24 * time.Hour
	// DefaultUnknownTypeDelay is how long a job of a type no handler knows
	// waits before it is tried again: 10 s.
	DefaultUnknownTypeDelay = 10 * time.Second
	// DefaultUnknownTypeLimit is how many times such a job is put back
	// before it goes to the dead set: 10.
	DefaultUnknownTypeLimit = 10
	// DefaultWorkerConcurrency is WorkerQueue.Concurrency's default: 10.
	DefaultWorkerConcurrency = 10
	// MaxJobProgressBytes bounds a progress value: 16 KiB.
	MaxJobProgressBytes = 16 << 10
	// MaxJobResultBytes bounds a handler's result: 64 KiB.
	MaxJobResultBytes = 64 << 10
	// MaxJobIDLength bounds a job ID: 128 bytes of [A-Za-z0-9_.-].
	MaxJobIDLength = 128
	// MaxJobTypeLength bounds a job type: 128 bytes.
	MaxJobTypeLength = 128
	// jobBatch bounds what one script call handles: due jobs promoted,
	// expired leases reaped, old jobs trimmed, jobs purged.
	jobBatch = 100
	// maxClaim bounds the jobs one claim call takes.
	maxClaim = 16
	// maxJobTraceBytes bounds the trace context stored with a job
	// (Tracer.InjectTrace's text): longer text is not stored.
	maxJobTraceBytes = 1024
)

// JobState is where a job is.
type JobState string

// The states of a job.
const (
	// JobScheduled: waiting for its delay or run-at time.
	JobScheduled JobState = "scheduled"
	// JobPending: ready, waiting for a worker.
	JobPending JobState = "pending"
	// JobActive: a worker holds its lease and runs it.
	JobActive JobState = "active"
	// JobRetrying: an attempt failed; waiting for its backoff.
	JobRetrying JobState = "retrying"
	// JobCompleted: done; kept KeepCompleted/KeepCompletedFor.
	JobCompleted JobState = "completed"
	// JobDead: failed for good; kept KeepDead/KeepDeadFor.
	JobDead JobState = "dead"
)

// Errors of the job queue.
var (
	// ErrPayloadTooLarge: a payload over MaxPayloadBytes (see
	// PayloadTooLargeError).
	ErrPayloadTooLarge = errors.New("redisecho: job payload too large")
	// ErrLeaseLost: the worker no longer holds the job's lease (it
	// expired and the job was reaped, or it ended). Nothing it reported
	// was applied. A transition retried after a lost reply may also get
	// it when the job was already finished and trimmed.
	ErrLeaseLost = errors.New("redisecho: job lease lost")
	// ErrJobNotFound: no such job (never enqueued, trimmed, deleted).
	ErrJobNotFound = errors.New("redisecho: job not found")
	// ErrJobNotCancellable: the job is active or finished.
	ErrJobNotCancellable = errors.New("redisecho: job is active or finished, not cancellable")
	// ErrInvalidJobID: a job ID outside 1-128 bytes of [A-Za-z0-9_.-].
	ErrInvalidJobID = errors.New("redisecho: job ID must be 1-128 bytes of [A-Za-z0-9_.-]")
	// ErrInvalidQueueName: a queue name outside 1-64 bytes of [A-Za-z0-9_.-].
	ErrInvalidQueueName = errors.New("redisecho: queue name must be 1-64 bytes of [A-Za-z0-9_.-]")
	// ErrInvalidJobType: an empty job type, or one over MaxJobTypeLength.
	ErrInvalidJobType = errors.New("redisecho: job type must be 1-128 bytes")
	// ErrProgressTooLarge: a progress value over MaxJobProgressBytes.
	ErrProgressTooLarge = errors.New("redisecho: job progress too large")
	// ErrResultTooLarge: a handler's result over MaxJobResultBytes. The
	// attempt fails (and is retried like any failure).
	ErrResultTooLarge = errors.New("redisecho: job result too large")
	// ErrSkipRetry, wrapped in a handler's error, sends the job to the
	// dead set at once, whatever attempts are left.
	ErrSkipRetry = errors.New("redisecho: skip retry")
	// ErrNoJobHandler: JobMux has no handler for the job's type. The job
	// is put back (UnknownTypeDelay) and dies after UnknownTypeLimit.
	ErrNoJobHandler = errors.New("redisecho: no handler for the job type")
	// ErrWorkerStarted: Start on a worker that was already started.
	ErrWorkerStarted = errors.New("redisecho: worker already started")
)

// PayloadTooLargeError is the error of an Enqueue whose payload is over
// MaxPayloadBytes. It matches ErrPayloadTooLarge with errors.Is.
type PayloadTooLargeError struct {
	Size, Max int
}

func (e *PayloadTooLargeError) Error() string {
	return fmt.Sprintf("redisecho: job payload of %d bytes is over the queue's %d", e.Size, e.Max)
}

// Is reports whether target is ErrPayloadTooLarge.
func (e *PayloadTooLargeError) Is(target error) bool { return target == ErrPayloadTooLarge }

// DuplicateJobError is the error of an Enqueue whose unique key is held
// by another job, until that job completes, dies or is cancelled.
type DuplicateJobError struct {
	// Key is the unique key; ID the job holding it.
	Key, ID string
}

func (e *DuplicateJobError) Error() string {
	return fmt.Sprintf("redisecho: unique key %q is held by job %s", e.Key, e.ID)
}

// Backoff computes the delay before a failed job's next attempt:
// Base × Factor^(attempt-1), capped at Cap, then shortened by up to Jitter
// of itself at random. It is stored with the job, so every worker applies
// the same. For a function of the error, see WorkerConfig.RetryDelay.
type Backoff struct {
	// Base is the first delay. Zero retries at once.
	Base time.Duration
	// Cap bounds the delay. Zero: no bound.
	Cap time.Duration
	// Factor multiplies the delay per attempt: 1 is fixed, 2 doubles. A
	// value below 1 counts as 1.
	Factor float64
	// Jitter in [0, 1] is the largest share of the delay taken off at
	// random, so that jobs that failed together do not retry together.
	Jitter float64
}

// FixedBackoff waits d before every retry, without jitter.
func FixedBackoff(d time.Duration) Backoff { return Backoff{Base: d, Cap: d, Factor: 1} }

// ExponentialBackoff waits base, then twice as long per attempt, up to
// limit, each delay shortened at random by up to a fifth.
func ExponentialBackoff(base, limit time.Duration) Backoff {
	return Backoff{Base: base, Cap: limit, Factor: 2, Jitter: 0.2}
}

// DefaultBackoff is QueueConfig.Backoff's default: ExponentialBackoff(1 s, 1 h).
var DefaultBackoff = ExponentialBackoff(time.Second, time.Hour)

// Delay returns the delay after the failed attempt (1 for the first),
// with rnd in [0, 1) choosing the jitter.
func (b Backoff) Delay(attempt int, rnd float64) time.Duration {
	f := max(b.Factor, 1)
	d := float64(b.Base) * math.Pow(f, float64(max(attempt, 1)-1))
	if b.Cap > 0 && d > float64(b.Cap) {
		d = float64(b.Cap)
	}
	if d > float64(math.MaxInt64/2) {
		d = float64(math.MaxInt64 / 2)
	}
	j := min(max(b.Jitter, 0), 1)
	d -= d * j * rnd
	return time.Duration(d)
}

// String encodes b as stored with a job: "base,cap,factor,jitter" in ms.
func (b Backoff) String() string {
	return strconv.FormatInt(b.Base.Milliseconds(), 10) + "," + strconv.FormatInt(b.Cap.Milliseconds(), 10) + "," +
		strconv.FormatFloat(b.Factor, 'g', -1, 64) + "," + strconv.FormatFloat(b.Jitter, 'g', -1, 64)
}

// parseBackoff decodes Backoff.String; ok is false for anything else.
func parseBackoff(s string) (Backoff, bool) {
	p := strings.Split(s, ",")
	if len(p) != 4 {
		return Backoff{}, false
	}
	base, e1 := strconv.ParseInt(p[0], 10, 64)
	limit, e2 := strconv.ParseInt(p[1], 10, 64)
	f, e3 := strconv.ParseFloat(p[2], 64)
	j, e4 := strconv.ParseFloat(p[3], 64)
	if e1 != nil || e2 != nil || e3 != nil || e4 != nil {
		return Backoff{}, false
	}
	return Backoff{Base: time.Duration(base) * time.Millisecond, Cap: time.Duration(limit) * time.Millisecond, Factor: f, Jitter: j}, true
}

// QueueConfig configures a Queue.
type QueueConfig struct {
	// Client is the rueidis client. Required. The queue never closes it.
	Client rueidis.Client
	// Options is the shared plumbing (Prefix, Timeout, Breaker, Clock,
	// Logger). Redis TIME decides due times, leases and reaping; Clock
	// only the jitter of delays.
	Options
	// Name is the queue's name, 1-64 bytes of [A-Za-z0-9_.-]. Default:
	// DefaultQueueName ("default").
	Name string
	// MaxPayloadBytes bounds a payload (after encoding). Default:
	// DefaultMaxPayloadBytes (512 KiB).
	MaxPayloadBytes int
	// MaxAttempts is how many times a job runs at most, unless its
	// JobMaxAttempts says otherwise. Default: DefaultMaxAttempts (3).
	MaxAttempts int
	// Backoff is the delay before retries, unless a job's JobBackoff says
	// otherwise. Default: DefaultBackoff (exponential from 1 s to 1 h,
	// with jitter).
	Backoff Backoff
	// KeepCompleted and KeepCompletedFor bound the completed jobs kept,
	// by count and age. Defaults: DefaultKeepCompleted (1000) and
	// DefaultKeepCompletedFor (24 h).
	KeepCompleted    int
	KeepCompletedFor time.Duration
	// KeepDead and KeepDeadFor bound the dead jobs kept. Defaults:
	// DefaultKeepDead (10,000) and DefaultKeepDeadFor (7 days).
	KeepDead    int
	KeepDeadFor time.Duration
	// UniqueTTL caps how long a unique key is held. Default:
	// DefaultUniqueTTL (24 h).
	UniqueTTL time.Duration
	// Hub, when set, receives the events of jobs enqueued with a
	// JobChannel: job:progress, job:completed, job:failed, job:dead.
	// Default: nil (events reach only WorkerConfig.OnEvent).
	Hub *Hub
	// Codec encodes payloads that are not []byte, and results and
	// progress values. Default: JSONCodec.
	Codec Codec
}

// Queue is a job queue in Redis: producers Enqueue, a Worker consumes.
// It is safe for concurrent use; build one per queue and share it.
type Queue struct {
	cfg   QueueConfig
	b     *backend
	keys  queueKeys
	codec Codec
	hub   *Hub

	registered atomic.Bool
	stats      jobCounters
}

// queueKeys are a queue's keys.
type queueKeys struct {
	pending, scheduled, retry, active, done, dead, marker, meta, reaper string
	job, unique                                                         string // prefixes: + ID, + digest
	queues                                                              string
}

func validName(s string, maxLen int) bool {
	if len(s) == 0 || len(s) > maxLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

// ValidJobID reports whether id is a well-formed job ID: 1-128 bytes of
// [A-Za-z0-9_.-]. Check IDs from requests with it before any lookup.
func ValidJobID(id string) bool { return validName(id, MaxJobIDLength) }

// NewQueue validates cfg and fills its defaults. It does no I/O.
func NewQueue(cfg QueueConfig) (*Queue, error) {
	b, err := newBackend("queue", cfg.Client, cfg.Options)
	if err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = DefaultQueueName
	}
	if !validName(cfg.Name, 64) {
		return nil, fmt.Errorf("queue: %w: %q", ErrInvalidQueueName, cfg.Name)
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&cfg.MaxPayloadBytes, DefaultMaxPayloadBytes)
	def(&cfg.MaxAttempts, DefaultMaxAttempts)
	def(&cfg.KeepCompleted, DefaultKeepCompleted)
	def(&cfg.KeepDead, DefaultKeepDead)
	defd(&cfg.KeepCompletedFor, DefaultKeepCompletedFor)
	defd(&cfg.KeepDeadFor, DefaultKeepDeadFor)
	defd(&cfg.UniqueTTL, DefaultUniqueTTL)
	if cfg.Backoff == (Backoff{}) {
		cfg.Backoff = DefaultBackoff
	}
	if cfg.Codec == nil {
		cfg.Codec = JSONCodec{}
	}
	g := b.keys.Group("jq", cfg.Name)
	q := &Queue{cfg: cfg, b: b, codec: cfg.Codec, hub: cfg.Hub, keys: queueKeys{
		pending: g.Key("pending"), scheduled: g.Key("scheduled"), retry: g.Key("retry"), active: g.Key("active"),
		done: g.Key("done"), dead: g.Key("dead"), marker: g.Key("marker"), meta: g.Key("meta"), reaper: g.Key("reaper"),
		job: g.Key("j") + ":", unique: g.Key("u") + ":", queues: b.keys.Key("jq", "queues"),
	}}
	if so, ok := cfg.Observer.(StateObserver); ok {
		so.ObserveQueue(q)
	}
	return q, nil
}

// Name returns the queue's name.
func (q *Queue) Name() string { return q.cfg.Name }

// JobStats counts what this process did with a queue (or, for a Worker,
// with its queues) since it started.
type JobStats struct {
	Enqueued, Started, Completed, Failed, Retried, Dead, Reaped, LeasesLost uint64
}

type jobCounters struct {
	enqueued, started, completed, failed, retried, dead, reaped, leasesLost atomic.Uint64
}

// Stats returns this process's counts for the queue.
func (q *Queue) Stats() JobStats {
	s := &q.stats
	return JobStats{s.enqueued.Load(), s.started.Load(), s.completed.Load(), s.failed.Load(), s.retried.Load(), s.dead.Load(), s.reaped.Load(), s.leasesLost.Load()}
}

func (s JobStats) add(o JobStats) JobStats {
	return JobStats{s.Enqueued + o.Enqueued, s.Started + o.Started, s.Completed + o.Completed, s.Failed + o.Failed,
		s.Retried + o.Retried, s.Dead + o.Dead, s.Reaped + o.Reaped, s.LeasesLost + o.LeasesLost}
}

// JobOption is an option of one Enqueue.
type JobOption func(*jobOptions)

type jobOptions struct {
	delay       time.Duration
	runAt       time.Time
	maxAttempts int
	backoff     *Backoff
	timeout     time.Duration
	id          string
	unique      string
	priority    int
	channel     string
}

// JobDelay runs the job d from now (Redis's now). Default: at once.
func JobDelay(d time.Duration) JobOption { return func(o *jobOptions) { o.delay = d } }

// JobRunAt runs the job at t (by Redis's clock). Default: at once.
func JobRunAt(t time.Time) JobOption { return func(o *jobOptions) { o.runAt = t } }

// JobMaxAttempts sets how many times the job runs at most. Default:
// QueueConfig.MaxAttempts.
func JobMaxAttempts(n int) JobOption { return func(o *jobOptions) { o.maxAttempts = n } }

// JobBackoff sets the job's retry delays. Default: QueueConfig.Backoff.
func JobBackoff(b Backoff) JobOption { return func(o *jobOptions) { o.backoff = &b } }

// JobTimeout bounds each attempt: the handler's context is cancelled after
// d. Default: none (the lease still ends a worker that vanished).
func JobTimeout(d time.Duration) JobOption { return func(o *jobOptions) { o.timeout = d } }

// JobID gives the job a caller-chosen ID (1-128 bytes of [A-Za-z0-9_.-]).
// Enqueueing the same ID again while the job is kept returns it (Existing)
// and adds nothing. Default: a random 22-character ID.
func JobID(id string) JobOption { return func(o *jobOptions) { o.id = id } }

// JobUniqueKey refuses the job with a *DuplicateJobError while another job
// holding key is scheduled, pending, active or retrying. Default: none.
func JobUniqueKey(key string) JobOption { return func(o *jobOptions) { o.unique = key } }

// JobPriority orders ready jobs: higher first (0-100), first in, first out
// within a priority. Default: 0.
func JobPriority(p int) JobOption { return func(o *jobOptions) { o.priority = p } }

// JobChannel publishes the job's events to channel through
// QueueConfig.Hub. Default: none.
func JobChannel(channel string) JobOption { return func(o *jobOptions) { o.channel = channel } }

// Enqueued is the outcome of an Enqueue.
type Enqueued struct {
	// ID is the job's ID.
	ID string
	// State is its state: scheduled or pending for a new job, or the
	// current state of the job that already had this JobID.
	State JobState
	// Existing tells that a job with this JobID was already there.
	Existing bool
}

// newJobID returns 22 characters of base62: 128 bits from crypto/rand.
func newJobID() string {
	const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	var b [22]byte
	var r [22]byte
	_, _ = rand.Read(r[:]) // crypto/rand never fails on supported platforms
	for i := range b {
		b[i] = alphabet[int(r[i])%62] // 22 × log2(62)·(bias ~0.3%) ≥ 128 bits
	}
	return string(b[:])
}

// lua's numbers are doubles: scripts format the numbers they store with
// n(), as integers with every digit (Lua 5.1's default keeps 14).
//
// soonest(meta, due) lowers the meta hash's "nd" (no scheduled or retrying
// job is due before it; absent: unknown) to due, when it is known: claims
// skip promotion until then.
const luaPrelude = `
local function n(x) return string.format('%.0f', x) end
local function soonest(meta, due)
  local cur = redis.call('HGET', meta, 'nd')
  if cur and due < tonumber(cur) then redis.call('HSET', meta, 'nd', n(due)) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nowus = tonumber(t[1]) * 1000000 + tonumber(t[2])
`

// enqueueScript adds one job.
//
// KEYS[1] pending, KEYS[2] scheduled, KEYS[3] marker, KEYS[4] meta,
// KEYS[5] the job's hash, KEYS[6] the unique key (or the job's hash again
// when there is none); all under the queue's tag.
// ARGV[1] id, [2] type, [3] payload, [4] max attempts, [5] priority,
// [6] delay ms, [7] run-at ms (-1: none), [8] timeout ms, [9] backoff,
// [10] channel, [11] "1" with a unique key, [12] unique TTL ms, [13] "1"
// when the caller chose the ID (a generated one, 128 random bits, is
// never checked for), [14] the trace context to store ("" for none; at
// most maxJobTraceBytes, checked by the caller).
// Returns {"OK", state}, {"EXISTS", state} or {"DUP", holder}.
// A job's hash leaves out what is empty or zero: attempts, tok, timeout,
// chan, uniq and tc (the trace context it was enqueued under, read back
// by each claim for the attempt's span) are written when they are not.
var enqueueScript = newPipelinedScript(luaPrelude + `
if ARGV[13] == '1' then
  local st = redis.call('HGET', KEYS[5], 'state')
  if st then return {'EXISTS', st} end
end
if ARGV[11] == '1' then
  local holder = redis.call('GET', KEYS[6])
  if holder then return {'DUP', holder} end
end
local due = now
if tonumber(ARGV[7]) >= 0 then due = tonumber(ARGV[7]) elseif tonumber(ARGV[6]) > 0 then due = now + tonumber(ARGV[6]) end
local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1) % 1099511627776
local score = (100 - tonumber(ARGV[5])) * 1099511627776 + seq
local state = 'pending'
if due > now then state = 'scheduled' end
local h = {'type', ARGV[2], 'payload', ARGV[3], 'state', state, 'max', ARGV[4], 'prio', ARGV[5],
  'score', n(score), 'backoff', ARGV[9], 'created', n(now), 'due', n(due)}
if ARGV[8] ~= '0' then h[#h + 1] = 'timeout'; h[#h + 1] = ARGV[8] end
if ARGV[10] ~= '' then h[#h + 1] = 'chan'; h[#h + 1] = ARGV[10] end
if ARGV[14] ~= '' then h[#h + 1] = 'tc'; h[#h + 1] = ARGV[14] end
if ARGV[11] == '1' then
  redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[12])
  h[#h + 1] = 'uniq'; h[#h + 1] = KEYS[6]
end
redis.call('HSET', KEYS[5], unpack(h))
if state == 'pending' then
  redis.call('ZADD', KEYS[1], n(score), ARGV[1])
  redis.call('ZADD', KEYS[3], 0, 'w')
else
  redis.call('ZADD', KEYS[2], n(due), ARGV[1])
  soonest(KEYS[4], due)
  local cur = redis.call('ZSCORE', KEYS[3], 'd')
  if not cur or due < tonumber(cur) then redis.call('ZADD', KEYS[3], n(due), 'd') end
end
return {'OK', state}
`)

// register adds the queue's name to the set of queues, once per Queue
// (retried by the next Enqueue if it failed). The set lives in another
// slot on a cluster, so it is a command of its own, before the job.
func (q *Queue) register(ctx context.Context) {
	if q.registered.Load() {
		return
	}
	if q.b.Do(ctx, q.keys.queues, q.b.client.B().Sadd().Key(q.keys.queues).Member(q.cfg.Name).Build()).Error() == nil {
		q.registered.Store(true)
	}
}

// Queues returns the names of the queues that have had a job, under
// opts.Prefix, from the set every Queue registers its name in.
func Queues(ctx context.Context, client rueidis.Client, opts Options) ([]string, error) {
	b, err := newBackend("queue", client, opts)
	if err != nil {
		return nil, err
	}
	key := b.keys.Key("jq", "queues")
	return b.Do(ctx, key, client.B().Smembers().Key(key).Build()).AsStrSlice()
}

// traceText returns ctx's trace context to store with a job: "" without a
// tracer, or when the tracer's text is over maxJobTraceBytes.
func (q *Queue) traceText(ctx context.Context) string {
	if q.b.tracer == nil {
		return ""
	}
	if tc := q.b.tracer.InjectTrace(ctx); len(tc) <= maxJobTraceBytes {
		return tc
	}
	return ""
}

// enqueueExec builds the script call of one job; tc is the trace context
// to store with it ("" for none).
func (q *Queue) enqueueExec(jobType string, payload any, opts []JobOption, tc string) (rueidis.LuaExec, string, *jobOptions, error) {
	var o jobOptions
	for _, f := range opts {
		f(&o)
	}
	if jobType == "" || len(jobType) > MaxJobTypeLength {
		return rueidis.LuaExec{}, "", nil, ErrInvalidJobType
	}
	chosen := "1"
	if o.id == "" {
		o.id, chosen = newJobID(), "0"
	} else if !ValidJobID(o.id) {
		return rueidis.LuaExec{}, "", nil, ErrInvalidJobID
	}
	if o.priority < 0 || o.priority > 100 {
		return rueidis.LuaExec{}, "", nil, fmt.Errorf("redisecho: job priority %d is outside 0-100", o.priority)
	}
	if o.maxAttempts <= 0 {
		o.maxAttempts = q.cfg.MaxAttempts
	}
	bo := q.cfg.Backoff
	if o.backoff != nil {
		bo = *o.backoff
	}
	var data []byte
	switch p := payload.(type) {
	case []byte:
		data = p
	case nil:
	default:
		var err error
		if data, err = q.codec.Marshal(payload); err != nil {
			return rueidis.LuaExec{}, "", nil, fmt.Errorf("redisecho: encode job payload: %w", err)
		}
	}
	if len(data) > q.cfg.MaxPayloadBytes {
		return rueidis.LuaExec{}, "", nil, &PayloadTooLargeError{Size: len(data), Max: q.cfg.MaxPayloadBytes}
	}
	runAt := int64(-1)
	if !o.runAt.IsZero() {
		runAt = max(o.runAt.UnixMilli(), 0)
	}
	jk := q.keys.job + o.id
	uk, hasUnique := jk, "0"
	if o.unique != "" {
		uk, hasUnique = q.keys.unique+Digest(o.unique), "1"
	}
	return rueidis.LuaExec{
		Keys: []string{q.keys.pending, q.keys.scheduled, q.keys.marker, q.keys.meta, jk, uk},
		Args: []string{o.id, jobType, string(data), strconv.Itoa(o.maxAttempts), strconv.Itoa(o.priority),
			strconv.FormatInt(max(o.delay.Milliseconds(), 0), 10), strconv.FormatInt(runAt, 10),
			strconv.FormatInt(max(o.timeout.Milliseconds(), 0), 10), bo.String(), o.channel, hasUnique,
			strconv.FormatInt(q.cfg.UniqueTTL.Milliseconds(), 10), chosen, tc},
	}, o.id, &o, nil
}

// enqueued reads the reply of enqueueScript.
func (q *Queue) enqueued(res rueidis.RedisResult, id string, o *jobOptions) (Enqueued, error) {
	vals, err := res.AsStrSlice()
	if err != nil {
		return Enqueued{}, fmt.Errorf("redisecho: enqueue: %w", err)
	}
	if len(vals) != 2 {
		return Enqueued{}, fmt.Errorf("redisecho: enqueue: unexpected reply %q", vals)
	}
	switch vals[0] {
	case "DUP":
		return Enqueued{}, &DuplicateJobError{Key: o.unique, ID: vals[1]}
	case "EXISTS":
		return Enqueued{ID: id, State: JobState(vals[1]), Existing: true}, nil
	}
	q.stats.enqueued.Add(1)
	return Enqueued{ID: id, State: JobState(vals[1])}, nil
}

// Enqueue adds a job of jobType with payload ([]byte as is, anything else
// through the Codec). One script call (and, the first time, the queue's
// registration), under the Timeout. Nothing is half-written: the job is
// added whole or not at all; an error after the script was sent (a
// timeout) means it may have been added, so retry with a JobID to make
// the retry safe.
func (q *Queue) Enqueue(ctx context.Context, jobType string, payload any, opts ...JobOption) (Enqueued, error) {
	exec, id, o, err := q.enqueueExec(jobType, payload, opts, q.traceText(ctx))
	if err != nil {
		return Enqueued{}, err
	}
	q.register(ctx)
	res := q.b.ExecMulti(ctx, q.keys.pending, enqueueScript, exec)
	e, err := q.enqueued(res[0], id, o)
	if err == nil && !e.Existing {
		q.b.observe(Observation{Kind: ObsJobEnqueued, Name: q.cfg.Name, N: 1})
	}
	return e, err
}

// BatchJob is one job of an EnqueueBatch.
type BatchJob struct {
	Type    string
	Payload any
	Options []JobOption
}

// BatchResult is the outcome of one job of an EnqueueBatch.
type BatchResult struct {
	Enqueued
	// Err is this job's error (a bad option, a payload too large, a
	// duplicate unique key, or the call's error).
	Err error
}

// EnqueueBatch adds jobs in one pipelined round trip: each job is added
// whole or not at all, independently. The error is that of the round trip
// (then every result carries it too).
func (q *Queue) EnqueueBatch(ctx context.Context, jobs []BatchJob) ([]BatchResult, error) {
	out := make([]BatchResult, len(jobs))
	execs := make([]rueidis.LuaExec, 0, len(jobs))
	idx := make([]int, 0, len(jobs))
	opts := make([]*jobOptions, len(jobs))
	tc := q.traceText(ctx)
	for i, j := range jobs {
		exec, id, o, err := q.enqueueExec(j.Type, j.Payload, j.Options, tc)
		if err != nil {
			out[i].Err = err
			continue
		}
		out[i].ID, opts[i] = id, o
		execs = append(execs, exec)
		idx = append(idx, i)
	}
	if len(execs) == 0 {
		return out, nil
	}
	q.register(ctx)
	var first error
	var added int64
	for k, r := range q.b.ExecMulti(ctx, q.keys.pending, enqueueScript, execs...) {
		i := idx[k]
		e, err := q.enqueued(r, out[i].ID, opts[i])
		out[i].Enqueued, out[i].Err = e, err
		if err == nil && !e.Existing {
			added++
		}
		if err != nil && first == nil {
			var dup *DuplicateJobError
			if !errors.As(err, &dup) {
				first = err
			}
		}
	}
	if added > 0 {
		q.b.observe(Observation{Kind: ObsJobEnqueued, Name: q.cfg.Name, N: added})
	}
	return out, first
}

// luaTake holds the claim's two steps, shared by claimScript and
// completeScript (which claims the finishing slot's next job). Both run
// under the queue's tag: the job hashes they compute (prefix + a popped
// ID) carry it.
//
// promote moves the due jobs of scheduled and retry (100 of each at most)
// to pending, unless meta's "nd" (nd: its value) says none is due yet,
// and then records the earliest due time left (9e15: none); it returns
// that time. take claims one popped job under a new lease and token and
// returns its fields ({id, token, attempt, type, payload, max, timeout,
// backoff, channel, wait, trace}), or nil when its hash is gone: wait is
// its pickup latency in µs, from its "due" (when it became ready: its
// enqueue, delay or run-at time, or its retry, reap or give-back time) to
// Redis's now, never negative (waitUs); trace is its "tc" ("" for none).
const luaTake = `
local function promote(pending, sched, retry, prefix, meta, nd)
  if nd and tonumber(nd) > now then return tonumber(nd) end
  for _, z in ipairs({sched, retry}) do
    local due = redis.call('ZRANGEBYSCORE', z, '-inf', n(now), 'LIMIT', 0, 100)
    if #due > 0 then
      redis.call('ZREM', z, unpack(due))
      for _, id in ipairs(due) do
        local jk = prefix .. id
        local sc = redis.call('HGET', jk, 'score')
        if sc then
          redis.call('HSET', jk, 'state', 'pending')
          redis.call('ZADD', pending, sc, id)
        end
      end
    end
  end
  local m = 9e15
  for _, z in ipairs({sched, retry}) do
    local h = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    if h[2] and tonumber(h[2]) < m then m = tonumber(h[2]) end
  end
  redis.call('HSET', meta, 'nd', n(m))
  return m
end
local function waitUs(due, atUs)
  local d = tonumber(due)
  if not d then return '0' end
  return n(math.max(0, atUs - d * 1000))
end
local function take(id, prefix, meta, active, leaseMs)
  local jk = prefix .. id
  local f = redis.call('HMGET', jk, 'tok', 'attempts', 'type', 'payload', 'max', 'timeout', 'backoff', 'chan', 'due', 'tc')
  if not f[3] then return nil end
  -- Tokens come from the queue's counter, not the job's, so that a job
  -- ID used again never hands out a token an earlier job's stale worker
  -- holds; and never below the job's own (a reap's +1).
  local tok = redis.call('HINCRBY', meta, 'tok', 1)
  local own = tonumber(f[1]) or 0
  if tok <= own then
    tok = own + 1
    redis.call('HSET', meta, 'tok', n(tok))
  end
  local att = (tonumber(f[2]) or 0) + 1
  redis.call('HSET', jk, 'tok', n(tok), 'attempts', att, 'state', 'active', 'started', n(now))
  redis.call('ZADD', active, n(now + leaseMs), id)
  return {id, n(tok), tostring(att), f[3], f[4] or '', f[5] or '1', f[6] or '0', f[7] or '', f[8] or '',
    waitUs(f[9], nowus), f[10] or ''}
end
`

// claimScript takes up to n ready jobs, after promoting the due ones.
//
// KEYS[1] pending, KEYS[2] scheduled, KEYS[3] retry, KEYS[4] active,
// KEYS[5] marker, KEYS[6] meta. ARGV[1] n, ARGV[2] lease ms, ARGV[3] the
// prefix of job hashes (+ ID: the script's tag), ARGV[4] "1" to put a
// wake-up back on the marker (rearm: after an abandoned wait).
// Returns {now, next due or -1, {job fields (luaTake)}...}.
var claimScript = newPipelinedScript(luaPrelude + luaTake + `
local m = redis.call('HMGET', KEYS[6], 'paused', 'nd')
local due = promote(KEYS[1], KEYS[2], KEYS[3], ARGV[3], KEYS[6], m[2])
local out = {}
local want = tonumber(ARGV[1])
if not m[1] then
  local popped = redis.call('ZPOPMIN', KEYS[1], want)
  for i = 1, #popped, 2 do
    local j = take(popped[i], ARGV[3], KEYS[6], KEYS[4], tonumber(ARGV[2]))
    if j then out[#out + 1] = j end
  end
  -- More left: keep the marker up for the other workers.
  if #popped == 2 * want and redis.call('ZCARD', KEYS[1]) > 0 then redis.call('ZADD', KEYS[5], 0, 'w') end
end
if ARGV[4] == '1' then redis.call('ZADD', KEYS[5], 0, 'w') end
local nd = -1
if due < 9e15 then nd = due end
return {n(now), n(nd), out}
`)

// claimed is what one claim returned.
type claimed struct {
	now     time.Time // Redis's
	nextDue time.Time // zero: nothing scheduled
	jobs    []*Job
}

// claim takes up to n ready jobs with a lease, after promoting due ones.
func (q *Queue) claim(ctx context.Context, n int, lease time.Duration) (claimed, error) {
	return q.claimRearm(ctx, n, lease, false)
}

// claimRearm is claim that, with rearm, also puts a wake-up on the marker.
//
// A worker rearms after it abandoned a wait (its due timer fired, or the
// call's deadline passed). The abandoned BZPOPMIN stays blocked in Redis
// until rueidis's CLIENT UNBLOCK, sent asynchronously, reaches the server;
// until then it may pop the wake-up of an enqueue or a retry made after
// this claim, and the worker's next wait would sleep its whole server
// timeout with work ready. The rearmed wake-up is eaten by the abandoned
// call if it is still blocked, so a later one reaches the next wait; if
// the abandoned call is already gone, the next wait returns at once and
// costs one empty claim.
func (q *Queue) claimRearm(ctx context.Context, n int, lease time.Duration, rearm bool) (claimed, error) {
	ra := "0"
	if rearm {
		ra = "1"
	}
	res := q.b.ExecMulti(ctx, q.keys.pending, claimScript, rueidis.LuaExec{
		Keys: []string{q.keys.pending, q.keys.scheduled, q.keys.retry, q.keys.active, q.keys.marker, q.keys.meta},
		Args: []string{strconv.Itoa(n), strconv.FormatInt(lease.Milliseconds(), 10), q.keys.job, ra},
	})[0]
	vals, err := res.ToArray()
	if err != nil {
		return claimed{}, err
	}
	if len(vals) != 3 {
		return claimed{}, fmt.Errorf("redisecho: claim: unexpected reply of %d values", len(vals))
	}
	var c claimed
	now, _ := vals[0].AsInt64()
	c.now = time.UnixMilli(now)
	if nd, _ := vals[1].AsInt64(); nd >= 0 {
		c.nextDue = time.UnixMilli(nd)
	}
	list, _ := vals[2].ToArray()
	for _, v := range list {
		if j := q.takenJob(v); j != nil {
			c.jobs = append(c.jobs, j)
		}
	}
	q.stats.started.Add(uint64(len(c.jobs)))
	if q.b.obs != nil {
		for _, j := range c.jobs {
			q.observeStarted(j)
		}
	}
	return c, nil
}

// observeStarted reports j's claim, with its pickup latency.
func (q *Queue) observeStarted(j *Job) {
	q.b.observe(Observation{Kind: ObsJobStarted, Name: q.cfg.Name, N: 1, Duration: j.wait})
}

// takenJob reads the fields of a job luaTake claimed; nil if malformed.
func (q *Queue) takenJob(v rueidis.RedisMessage) *Job {
	f, err := v.AsStrSlice()
	if err != nil || len(f) != 11 {
		return nil
	}
	tok, _ := strconv.ParseInt(f[1], 10, 64)
	att, _ := strconv.Atoi(f[2])
	maxAtt, _ := strconv.Atoi(f[5])
	tmo, _ := strconv.ParseInt(f[6], 10, 64)
	bo, ok := parseBackoff(f[7])
	if !ok {
		bo = q.cfg.Backoff
	}
	wait, _ := strconv.ParseInt(f[9], 10, 64)
	return &Job{
		ID: f[0], Queue: q.cfg.Name, Type: f[3], Payload: []byte(f[4]), Attempt: att, MaxAttempts: maxAtt,
		tok: tok, q: q, timeout: time.Duration(tmo) * time.Millisecond, backoff: bo, channel: f[8],
		wait: time.Duration(max(wait, 0)) * time.Microsecond, trace: f[10],
	}
}

// jobLease names one lease: a job and its fencing token.
type jobLease struct {
	id  string
	tok int64
}

// heartbeatScript renews leases whose token still matches.
//
// KEYS[1] active. ARGV[1] lease ms, ARGV[2] the prefix of job hashes (+ ID:
// the script's tag), then ID and token pairs. Returns the ID and token
// pairs whose lease was lost.
var heartbeatScript = newPipelinedScript(luaPrelude + `
local lost = {}
for i = 3, #ARGV, 2 do
  local f = redis.call('HMGET', ARGV[2] .. ARGV[i], 'state', 'tok')
  if f[1] == 'active' and f[2] == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', n(now + tonumber(ARGV[1])), ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
    lost[#lost + 1] = ARGV[i + 1]
  end
end
return lost
`)

// heartbeat renews leases and returns those that were lost.
func (q *Queue) heartbeat(ctx context.Context, lease time.Duration, leases []jobLease) ([]jobLease, error) {
	if len(leases) == 0 {
		return nil, nil
	}
	args := make([]string, 0, 2+2*len(leases))
	args = append(args, strconv.FormatInt(lease.Milliseconds(), 10), q.keys.job)
	for _, l := range leases {
		args = append(args, l.id, strconv.FormatInt(l.tok, 10))
	}
	res := q.b.ExecMulti(ctx, q.keys.pending, heartbeatScript, rueidis.LuaExec{Keys: []string{q.keys.active}, Args: args})[0]
	vals, err := res.AsStrSlice()
	if err != nil {
		return nil, err
	}
	lost := make([]jobLease, 0, len(vals)/2)
	for i := 0; i+1 < len(vals); i += 2 {
		tok, _ := strconv.ParseInt(vals[i+1], 10, 64)
		lost = append(lost, jobLease{id: vals[i], tok: tok})
	}
	return lost, nil
}

// luaFence checks a transition against the job's token: 'OK' when the job
// is active under tok, 'REPEAT' when this very transition (kind) was the
// last one applied under tok (a retry after a lost reply), 'GONE' when the
// job is no more, 'LOST' otherwise. fenced does the same on fields already
// read: state, tok, lt, lk.
//
// finish adds a finished job to z (done or dead), scored by Redis's µs
// clock (strictly increasing), and trims z: by count once it holds more than keep + keep/32
// (at most keep + 32), down to keep, 100 at most per call; else by age
// when its oldest is older than ageMs. The jobs it trims are deleted
// (prefix + ID: the script's tag).
//
// histJSON appends an attempt to a job's history (raw: its JSON, maybe
// empty), keeping the last 10; history does it in the job's hash.
const luaFence = `
local function fenced(f, tok, kind)
  if not f[1] then return 'GONE' end
  if f[1] == 'active' and f[2] == tok then return 'OK' end
  if f[3] == tok and f[4] == kind then return 'REPEAT' end
  return 'LOST'
end
local function fence(jk, tok, kind)
  return fenced(redis.call('HMGET', jk, 'state', 'tok', 'lt', 'lk'), tok, kind)
end
local function releaseKey(u, id)
  if u and redis.call('GET', u) == id then redis.call('DEL', u) end
end
local function release(jk, id)
  releaseKey(redis.call('HGET', jk, 'uniq'), id)
end
local function finish(z, jk, id, keep, ageMs, prefix)
  -- Strictly increasing scores, even if Redis's clock steps back (a
  -- failover to a host behind): else the count trim could take the job
  -- just finished.
  local us = nowus
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) >= us then us = tonumber(last[2]) + 1 end
  redis.call('ZADD', z, n(us), id)
  local over = redis.call('ZCARD', z) - keep
  local trimmed
  if over > math.min(32, math.floor(keep / 32)) then
    trimmed = redis.call('ZRANGE', z, 0, math.min(over, 100) - 1)
  else
    local cut = nowus - ageMs * 1000
    local oldest = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    if oldest[2] and tonumber(oldest[2]) < cut then
      trimmed = redis.call('ZRANGEBYSCORE', z, '-inf', n(cut), 'LIMIT', 0, 100)
    end
  end
  if trimmed and #trimmed > 0 then
    redis.call('ZREM', z, unpack(trimmed))
    local ks = {}
    for i, x in ipairs(trimmed) do ks[i] = prefix .. x end
    redis.call('DEL', unpack(ks))
  end
end
local function histJSON(raw, att, started, err)
  if not raw or raw == '' or raw == '{}' or raw == '[]' then
    return '[{"a":' .. n(tonumber(att) or 0) .. ',"s":' .. n(tonumber(started) or 0) .. ',"e":' .. n(now) .. ',"err":' .. cjson.encode(err) .. '}]'
  end
  local h = cjson.decode(raw)
  h[#h + 1] = {a = tonumber(att) or 0, s = tonumber(started) or 0, e = now, err = err}
  while #h > 10 do table.remove(h, 1) end
  return cjson.encode(h)
end
local function history(jk, att, started, err)
  redis.call('HSET', jk, 'hist', histJSON(redis.call('HGET', jk, 'hist'), att, started, err))
end
`

// completeScript completes a job and, when asked, claims the next ready
// job for the slot it frees (promoting due ones first, as claimScript).
//
// KEYS[1] active, KEYS[2] done, KEYS[3] the job's hash, KEYS[4] pending,
// KEYS[5] scheduled, KEYS[6] retry, KEYS[7] meta. ARGV[1] id, [2] token,
// [3] result, [4] keep count, [5] keep ms, [6] the prefix of job hashes
// (+ ID of a trimmed or claimed job: the script's tag), [7] "1" to claim
// the next job, [8] its lease ms. The unique key it releases is read from
// the job (the script's tag). Returns {"OK"}, {"OK", next job's fields
// (luaTake)}, {"LOST"} or {"GONE"}. A repeat (the reply was lost) hands
// back the job the first call claimed, if it is still under that lease
// (its ID and token are kept in the completed job's "nx"), its wait
// measured to its claim ("started"), not to the repeat.
var completeScript = newPipelinedScript(luaPrelude + luaFence + luaTake + `
local f = redis.call('HMGET', KEYS[3], 'state', 'tok', 'lt', 'lk', 'attempts', 'started', 'uniq', 'hist', 'nx')
local st = fenced(f, ARGV[2], 'complete')
if st == 'REPEAT' then
  if not f[9] or f[9] == '' then return {'OK'} end
  local id, tok = string.match(f[9], '^(.*):(%d+)$')
  local nk = ARGV[6] .. id
  local g = redis.call('HMGET', nk, 'state', 'tok', 'attempts', 'type', 'payload', 'max', 'timeout', 'backoff', 'chan',
    'due', 'tc', 'started')
  if g[1] ~= 'active' or g[2] ~= tok then return {'OK'} end
  redis.call('ZADD', KEYS[1], 'XX', n(now + tonumber(ARGV[8])), id)
  return {'OK', {id, tok, g[3], g[4], g[5] or '', g[6] or '1', g[7] or '0', g[8] or '', g[9] or '',
    waitUs(g[10], (tonumber(g[12]) or now) * 1000), g[11] or ''}}
end
if st ~= 'OK' then return {st} end
redis.call('ZREM', KEYS[1], ARGV[1])
local nx, nf = '', nil
if ARGV[7] == '1' then
  local m = redis.call('HMGET', KEYS[7], 'paused', 'nd')
  promote(KEYS[4], KEYS[5], KEYS[6], ARGV[6], KEYS[7], m[2])
  if not m[1] then
    local p = redis.call('ZPOPMIN', KEYS[4], 1)
    if p[1] then
      nf = take(p[1], ARGV[6], KEYS[7], KEYS[1], tonumber(ARGV[8]))
      if nf then nx = nf[1] .. ':' .. nf[2] end
    end
  end
end
redis.call('HSET', KEYS[3], 'state', 'completed', 'finished', n(now), 'lt', ARGV[2], 'lk', 'complete', 'result', ARGV[3],
  'error', '', 'hist', histJSON(f[8], f[5], f[6], ''), 'nx', nx)
releaseKey(f[7], ARGV[1])
finish(KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6])
if nf then return {'OK', nf} end
return {'OK'}
`)

// fenceStatuses reads the status of a fenced transition: a job that is
// gone or under another token means the lease was lost.
var fenceStatuses = map[string]error{"OK": nil, "LOST": ErrLeaseLost, "GONE": ErrLeaseLost}

// scriptStatus reads a script's status reply through statuses (a status
// that maps to nil is success); a reply not in it is an error.
func scriptStatus(res rueidis.RedisResult, statuses map[string]error) error {
	s, err := res.ToString()
	if err != nil {
		return err
	}
	if e, ok := statuses[s]; ok {
		return e
	}
	return fmt.Errorf("redisecho: unexpected reply %q", s)
}

// complete applies a completion under tok; with next, it also claims the
// next ready job (under lease) for the slot, returned (else nil).
func (q *Queue) complete(ctx context.Context, id string, tok int64, result []byte, next bool, lease time.Duration) (*Job, error) {
	claim := "0"
	if next {
		claim = "1"
	}
	res := q.b.ExecMulti(ctx, q.keys.pending, completeScript, rueidis.LuaExec{
		Keys: []string{q.keys.active, q.keys.done, q.keys.job + id, q.keys.pending, q.keys.scheduled, q.keys.retry, q.keys.meta},
		Args: []string{id, strconv.FormatInt(tok, 10), string(result), strconv.Itoa(q.cfg.KeepCompleted),
			strconv.FormatInt(q.cfg.KeepCompletedFor.Milliseconds(), 10), q.keys.job, claim, strconv.FormatInt(lease.Milliseconds(), 10)},
	})[0]
	vals, st, err := statusReply(res)
	if err != nil {
		return nil, err
	}
	if e, ok := fenceStatuses[st]; !ok || e != nil || len(vals) > 2 {
		if ok && e != nil {
			return nil, e
		}
		return nil, fmt.Errorf("redisecho: complete: unexpected reply %v", vals)
	}
	if len(vals) < 2 {
		return nil, nil
	}
	j := q.takenJob(vals[1])
	if j != nil {
		q.stats.started.Add(1)
		q.observeStarted(j)
	}
	return j, nil
}

// failScript records a failed attempt: a retry after delay, or death.
//
// KEYS[1] active, KEYS[2] retry, KEYS[3] dead, KEYS[4] marker, KEYS[5] the
// job's hash, KEYS[6] meta. ARGV[1] id, [2] token, [3] error, [4] delay ms, [5] "1" to
// skip retries, [6] keep dead count, [7] keep dead ms, [8] the prefix of
// job hashes (trimmed jobs: the script's tag), [9] "unknown" when no
// handler knew the type (the attempt does not count; death after ARGV[10]
// such returns). Returns {"retry", due ms}, {"dead"}, {"LOST"} or {"GONE"}.
var failScript = newPipelinedScript(luaPrelude + luaFence + `
local st = fence(KEYS[5], ARGV[2], 'fail')
if st == 'REPEAT' then
  local f = redis.call('HMGET', KEYS[5], 'state', 'due')
  if f[1] == 'dead' then return {'dead'} end
  return {'retry', f[2] or '0'}
end
if st ~= 'OK' then return {st} end
local f = redis.call('HMGET', KEYS[5], 'attempts', 'max', 'started')
local att, max = tonumber(f[1]), tonumber(f[2])
history(KEYS[5], f[1], f[3], ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
local dead
if ARGV[9] == 'unknown' then
  att = att - 1
  redis.call('HSET', KEYS[5], 'attempts', att)
  dead = redis.call('HINCRBY', KEYS[5], 'unknown', 1) > tonumber(ARGV[10])
else
  dead = ARGV[5] == '1' or att >= max
end
redis.call('HSET', KEYS[5], 'error', ARGV[3], 'lt', ARGV[2], 'lk', 'fail')
if dead then
  redis.call('HSET', KEYS[5], 'state', 'dead', 'finished', n(now))
  release(KEYS[5], ARGV[1])
  finish(KEYS[3], KEYS[5], ARGV[1], tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8])
  return {'dead'}
end
local due = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[5], 'state', 'retrying', 'due', n(due))
redis.call('ZADD', KEYS[2], n(due), ARGV[1])
soonest(KEYS[6], due)
local cur = redis.call('ZSCORE', KEYS[4], 'd')
if not cur or due < tonumber(cur) then redis.call('ZADD', KEYS[4], n(due), 'd') end
return {'retry', n(due)}
`)

// fail records a failed attempt under tok: retried after delay (retry),
// or dead. unknown marks a job no handler knew: the attempt does not
// count, and it dies after limit such returns.
func (q *Queue) fail(ctx context.Context, id string, tok int64, msg string, delay time.Duration, skipRetry, unknown bool, limit int) (retry bool, at time.Time, err error) {
	skip, kind := "0", ""
	if skipRetry {
		skip = "1"
	}
	if unknown {
		kind = "unknown"
	}
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	res := q.b.ExecMulti(ctx, q.keys.pending, failScript, rueidis.LuaExec{
		Keys: []string{q.keys.active, q.keys.retry, q.keys.dead, q.keys.marker, q.keys.job + id, q.keys.meta},
		Args: []string{id, strconv.FormatInt(tok, 10), msg, strconv.FormatInt(max(delay.Milliseconds(), 0), 10), skip,
			strconv.Itoa(q.cfg.KeepDead), strconv.FormatInt(q.cfg.KeepDeadFor.Milliseconds(), 10), q.keys.job, kind, strconv.Itoa(limit)},
	})[0]
	vals, err := res.AsStrSlice()
	if err != nil {
		return false, time.Time{}, err
	}
	switch {
	case len(vals) == 2 && vals[0] == "retry":
		ms, _ := strconv.ParseInt(vals[1], 10, 64)
		return true, time.UnixMilli(ms), nil
	case len(vals) == 1 && vals[0] == "dead":
		return false, time.Time{}, nil
	case len(vals) == 1 && fenceStatuses[vals[0]] != nil:
		return false, time.Time{}, fenceStatuses[vals[0]]
	}
	return false, time.Time{}, fmt.Errorf("redisecho: fail: unexpected reply %q", vals)
}

// progressScript stores a progress value under the job's token.
//
// KEYS[1] the job's hash. ARGV[1] token, ARGV[2] value. Returns "OK",
// "LOST" or "GONE".
var progressScript = newPipelinedScript(luaPrelude + luaFence + `
local st = fence(KEYS[1], ARGV[1], 'progress')
if st ~= 'OK' then
  if st == 'REPEAT' then return 'LOST' end
  return st
end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
return 'OK'
`)

func (q *Queue) progress(ctx context.Context, id string, tok int64, value []byte) error {
	if len(value) > MaxJobProgressBytes {
		return ErrProgressTooLarge
	}
	res := q.b.ExecMulti(ctx, q.keys.pending, progressScript, rueidis.LuaExec{
		Keys: []string{q.keys.job + id}, Args: []string{strconv.FormatInt(tok, 10), string(value)},
	})[0]
	return scriptStatus(res, fenceStatuses)
}

// giveBackScript returns a job at shutdown, without counting the attempt;
// it is due again from now (its next claim's wait counts from here).
//
// KEYS[1] active, KEYS[2] pending, KEYS[3] marker, KEYS[4] the job's hash.
// ARGV[1] id, ARGV[2] token. Returns "OK", "LOST" or "GONE".
var giveBackScript = newPipelinedScript(luaPrelude + luaFence + `
local st = fence(KEYS[4], ARGV[2], 'giveback')
if st == 'REPEAT' then return 'OK' end
if st ~= 'OK' then return st end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'attempts', -1)
redis.call('HSET', KEYS[4], 'state', 'pending', 'lt', ARGV[2], 'lk', 'giveback', 'due', n(now))
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[4], 'score'), ARGV[1])
redis.call('ZADD', KEYS[3], 0, 'w')
return 'OK'
`)

func (q *Queue) giveBack(ctx context.Context, id string, tok int64) error {
	res := q.b.ExecMulti(ctx, q.keys.pending, giveBackScript, rueidis.LuaExec{
		Keys: []string{q.keys.active, q.keys.pending, q.keys.marker, q.keys.job + id},
		Args: []string{id, strconv.FormatInt(tok, 10)},
	})[0]
	return scriptStatus(res, fenceStatuses)
}

// reapScript returns the jobs whose lease expired, at most 100, once per
// interval whoever calls it; a job put back is due again from now.
//
// KEYS[1] the reaper lock, KEYS[2] active, KEYS[3] pending, KEYS[4] dead,
// KEYS[5] marker. ARGV[1] interval ms, [2] stall limit, [3] the prefix of
// job hashes (+ ID: the script's tag), [4] keep dead count, [5] keep dead
// ms. Returns {-1, 0} when the lock is held, else {reaped, of which dead}.
var reapScript = newPipelinedScript(luaPrelude + luaFence + `
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return {-1, 0} end
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', n(now), 'LIMIT', 0, 100)
local dead = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  local jk = ARGV[3] .. id
  if redis.call('EXISTS', jk) == 1 then
    redis.call('HINCRBY', jk, 'tok', 1)
    local stalls = redis.call('HINCRBY', jk, 'stalls', 1)
    local f = redis.call('HMGET', jk, 'attempts', 'max', 'started')
    history(jk, f[1], f[3], 'lease expired')
    local why
    if stalls >= tonumber(ARGV[2]) then why = 'stalled: lost its lease ' .. stalls .. ' times'
    elseif tonumber(f[1]) >= tonumber(f[2]) then why = 'lease expired on the last attempt' end
    if why then
      redis.call('HSET', jk, 'state', 'dead', 'error', why, 'finished', n(now))
      release(jk, id)
      finish(KEYS[4], jk, id, tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[3])
      dead = dead + 1
    else
      redis.call('HSET', jk, 'state', 'pending', 'error', 'lease expired', 'due', n(now))
      redis.call('ZADD', KEYS[3], redis.call('HGET', jk, 'score'), id)
      redis.call('ZADD', KEYS[5], 0, 'w')
    end
  end
end
return {#ids, dead}
`)

// reap returns jobs whose lease expired, if no one else did within
// interval; reaped is -1 when another holds the lock.
func (q *Queue) reap(ctx context.Context, interval time.Duration, stallLimit int) (reaped, dead int, err error) {
	res := q.b.ExecMulti(ctx, q.keys.pending, reapScript, rueidis.LuaExec{
		Keys: []string{q.keys.reaper, q.keys.active, q.keys.pending, q.keys.dead, q.keys.marker},
		Args: []string{strconv.FormatInt(max(interval.Milliseconds(), 1), 10), strconv.Itoa(stallLimit), q.keys.job,
			strconv.Itoa(q.cfg.KeepDead), strconv.FormatInt(q.cfg.KeepDeadFor.Milliseconds(), 10)},
	})[0]
	vals, err := res.AsIntSlice()
	if err != nil || len(vals) != 2 {
		return 0, 0, err
	}
	if vals[0] > 0 {
		q.stats.reaped.Add(uint64(vals[0]))
		q.stats.dead.Add(uint64(vals[1]))
		q.b.observe(Observation{Kind: ObsJobReaped, Name: q.cfg.Name, N: vals[0]})
		if vals[1] > 0 {
			q.b.observe(Observation{Kind: ObsJobDead, Name: q.cfg.Name, N: vals[1]})
		}
	}
	return int(vals[0]), int(vals[1]), nil
}

// wait blocks until the marker says there is work (woken) or
// serverTimeout passes, or ctx ends.
func (q *Queue) wait(ctx context.Context, serverTimeout time.Duration) (woken bool, err error) {
	cmd := q.b.client.B().Bzpopmin().Key(q.keys.marker).Timeout(serverTimeout.Seconds()).Build()
	res := q.b.DoBlocking(ctx, q.keys.marker, cmd, serverTimeout)
	if err := res.Error(); err != nil {
		if rueidis.IsRedisNil(err) {
			return false, nil
		}
		return false, err
	}
	return true, nil
}

// cancelScript deletes a job that has not started.
//
// KEYS[1] pending, KEYS[2] scheduled, KEYS[3] retry, KEYS[4] the job's
// hash. ARGV[1] id. The unique key it releases is read from the job (the
// script's tag). Returns "OK", "GONE" or "BUSY".
var cancelScript = newPipelinedScript(luaPrelude + luaFence + `
local st = redis.call('HGET', KEYS[4], 'state')
if not st then return 'GONE' end
if st ~= 'pending' and st ~= 'scheduled' and st ~= 'retrying' then return 'BUSY' end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
release(KEYS[4], ARGV[1])
redis.call('DEL', KEYS[4])
return 'OK'
`)

// Cancel deletes a scheduled, pending or retrying job, and releases its
// unique key. ErrJobNotFound when there is no such job,
// ErrJobNotCancellable when it is active or finished.
func (q *Queue) Cancel(ctx context.Context, id string) error {
	return q.execByID(ctx, id, cancelScript, ErrJobNotCancellable, q.keys.pending, q.keys.scheduled, q.keys.retry)
}

// execByID runs script on the job id, whose hash is its last key after
// keys, with the ID as its one argument, and reads its status: "OK",
// "GONE" (ErrJobNotFound) or "BUSY" (busy).
// A malformed ID is ErrJobNotFound before it reaches a key.
func (q *Queue) execByID(ctx context.Context, id string, script *pipelinedScript, busy error, keys ...string) error {
	if !ValidJobID(id) {
		return ErrJobNotFound
	}
	res := q.b.ExecMulti(ctx, q.keys.pending, script, rueidis.LuaExec{Keys: append(keys, q.keys.job+id), Args: []string{id}})[0]
	return scriptStatus(res, map[string]error{"OK": nil, "GONE": ErrJobNotFound, "BUSY": busy})
}

// Pause stops workers from starting the queue's jobs (running ones
// finish); enqueueing goes on. It holds until Resume.
func (q *Queue) Pause(ctx context.Context) error {
	return q.b.Do(ctx, q.keys.meta, q.b.client.B().Hset().Key(q.keys.meta).FieldValue().FieldValue("paused", "1").Build()).Error()
}

// Resume undoes Pause and wakes idle workers.
func (q *Queue) Resume(ctx context.Context) error {
	_, err := multiErr(q.b.DoMulti(ctx, q.keys.meta,
		q.b.client.B().Hdel().Key(q.keys.meta).Field("paused").Build(),
		q.b.client.B().Zadd().Key(q.keys.marker).ScoreMember().ScoreMember(0, "w").Build()))
	return err
}

// Paused reports whether the queue is paused.
func (q *Queue) Paused(ctx context.Context) (bool, error) {
	return q.b.Do(ctx, q.keys.meta, q.b.client.B().Hexists().Key(q.keys.meta).Field("paused").Build()).AsBool()
}

// JobCounts are a queue's jobs per state.
type JobCounts struct {
	Scheduled int64 `json:"scheduled"`
	Pending   int64 `json:"pending"`
	Active    int64 `json:"active"`
	Retrying  int64 `json:"retrying"`
	Completed int64 `json:"completed"`
	Dead      int64 `json:"dead"`
}

// Counts returns the queue's jobs per state: six ZCARDs in one round trip.
// Scheduled and retrying jobs that are due but not yet promoted by a
// worker still count as scheduled and retrying.
func (q *Queue) Counts(ctx context.Context) (JobCounts, error) {
	k := q.keys
	cmds := make([]rueidis.Completed, 0, 6)
	for _, z := range []string{k.scheduled, k.pending, k.active, k.retry, k.done, k.dead} {
		cmds = append(cmds, q.b.client.B().Zcard().Key(z).Build())
	}
	res := q.b.DoMulti(ctx, k.pending, cmds...)
	var n [6]int64
	for i, r := range res {
		v, err := r.AsInt64()
		if err != nil {
			return JobCounts{}, err
		}
		n[i] = v
	}
	return JobCounts{Scheduled: n[0], Pending: n[1], Active: n[2], Retrying: n[3], Completed: n[4], Dead: n[5]}, nil
}

// JobAttempt is one attempt in a job's history.
type JobAttempt struct {
	Attempt    int       `json:"attempt"`
	StartedAt  time.Time `json:"startedAt"`
	FinishedAt time.Time `json:"finishedAt"`
	// Error is the attempt's error; empty for the one that completed.
	Error string `json:"error,omitempty"`
}

// JobInfo is a job as the inspector shows it.
type JobInfo struct {
	ID          string   `json:"id"`
	Queue       string   `json:"queue"`
	Type        string   `json:"type"`
	State       JobState `json:"state"`
	Attempts    int      `json:"attempts"`
	MaxAttempts int      `json:"maxAttempts"`
	Priority    int      `json:"priority"`
	// Error is the last attempt's error.
	Error string `json:"error,omitempty"`
	// History holds the last 10 attempts, oldest first.
	History []JobAttempt `json:"history,omitempty"`
	// Payload, Progress and Result are as stored (Codec-encoded).
	Payload  []byte `json:"-"`
	Progress []byte `json:"-"`
	Result   []byte `json:"-"`
	// Channel is the JobChannel it was enqueued with.
	Channel    string    `json:"channel,omitempty"`
	CreatedAt  time.Time `json:"createdAt"`
	DueAt      time.Time `json:"dueAt"`
	StartedAt  time.Time `json:"startedAt,omitzero"`
	FinishedAt time.Time `json:"finishedAt,omitzero"`
}

func msTime(s string) time.Time {
	ms, err := strconv.ParseInt(s, 10, 64)
	if err != nil || ms <= 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}

// jobInfo decodes a job's hash.
func (q *Queue) jobInfo(id string, m map[string]string) JobInfo {
	atoi := func(s string) int { v, _ := strconv.Atoi(s); return v }
	info := JobInfo{
		ID: id, Queue: q.cfg.Name, Type: m["type"], State: JobState(m["state"]), Attempts: atoi(m["attempts"]),
		MaxAttempts: atoi(m["max"]), Priority: atoi(m["prio"]), Error: m["error"], Channel: m["chan"],
		CreatedAt: msTime(m["created"]), DueAt: msTime(m["due"]), StartedAt: msTime(m["started"]), FinishedAt: msTime(m["finished"]),
	}
	if v, ok := m["payload"]; ok {
		info.Payload = []byte(v)
	}
	if v, ok := m["progress"]; ok {
		info.Progress = []byte(v)
	}
	if v, ok := m["result"]; ok && v != "" {
		info.Result = []byte(v)
	}
	var h []struct {
		A   int    `json:"a"`
		S   int64  `json:"s"`
		E   int64  `json:"e"`
		Err string `json:"err"`
	}
	if raw := m["hist"]; raw != "" && json.Unmarshal([]byte(raw), &h) == nil {
		for _, a := range h {
			info.History = append(info.History, JobAttempt{Attempt: a.A, StartedAt: time.UnixMilli(a.S), FinishedAt: time.UnixMilli(a.E), Error: a.Err})
		}
	}
	return info
}

// Job returns the job with id (ErrJobNotFound when there is none, or the
// ID is malformed: it is checked before it reaches a key). The read is a
// plain round trip, never tracked by client-side caching.
func (q *Queue) Job(ctx context.Context, id string) (JobInfo, error) {
	if !ValidJobID(id) {
		return JobInfo{}, ErrJobNotFound
	}
	jk := q.keys.job + id
	m, err := q.b.Do(ctx, jk, q.b.client.B().Hgetall().Key(jk).Build()).AsStrMap()
	if err != nil {
		return JobInfo{}, err
	}
	if len(m) == 0 {
		return JobInfo{}, ErrJobNotFound
	}
	return q.jobInfo(id, m), nil
}

// stateKey returns the sorted set of state.
func (q *Queue) stateKey(state JobState) (string, bool) {
	switch state {
	case JobScheduled:
		return q.keys.scheduled, true
	case JobPending:
		return q.keys.pending, true
	case JobActive:
		return q.keys.active, true
	case JobRetrying:
		return q.keys.retry, true
	case JobCompleted:
		return q.keys.done, true
	case JobDead:
		return q.keys.dead, true
	}
	return "", false
}

// MaxJobsPage bounds Jobs's limit: 1000.
const MaxJobsPage = 1000

// Jobs returns up to limit (at most MaxJobsPage) jobs in state from offset:
// completed and dead ones newest first, the others in the order they will
// run (pending by priority, scheduled and retrying by due time, active by
// lease deadline). Two round trips.
func (q *Queue) Jobs(ctx context.Context, state JobState, offset, limit int) ([]JobInfo, error) {
	z, ok := q.stateKey(state)
	if !ok {
		return nil, fmt.Errorf("redisecho: unknown job state %q", state)
	}
	limit = min(max(limit, 0), MaxJobsPage)
	if limit == 0 {
		return nil, nil
	}
	offset = max(offset, 0)
	cmd := q.b.client.B().Zrange().Key(z).Min(strconv.Itoa(offset)).Max(strconv.Itoa(offset + limit - 1))
	var ids []string
	var err error
	if state == JobCompleted || state == JobDead {
		ids, err = q.b.Do(ctx, z, cmd.Rev().Build()).AsStrSlice()
	} else {
		ids, err = q.b.Do(ctx, z, cmd.Build()).AsStrSlice()
	}
	if err != nil || len(ids) == 0 {
		return nil, err
	}
	cmds := make([]rueidis.Completed, len(ids))
	for i, id := range ids {
		cmds[i] = q.b.client.B().Hgetall().Key(q.keys.job + id).Build()
	}
	out := make([]JobInfo, 0, len(ids))
	for i, r := range q.b.DoMulti(ctx, z, cmds...) {
		m, err := r.AsStrMap()
		if err != nil {
			return nil, err
		}
		if len(m) > 0 {
			out = append(out, q.jobInfo(ids[i], m))
		}
	}
	return out, nil
}

// retryDeadScript puts a dead job back in the queue, with its attempts
// reset (its history kept).
//
// KEYS[1] dead, KEYS[2] pending, KEYS[3] marker, KEYS[4] the job's hash.
// ARGV[1] id. Returns "OK" or "GONE" (no dead job with this ID).
var retryDeadScript = newPipelinedScript(luaPrelude + `
if redis.call('HGET', KEYS[4], 'state') ~= 'dead' then return 'GONE' end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[4], 'state', 'pending', 'attempts', 0, 'stalls', 0, 'unknown', 0, 'due', n(now))
redis.call('HDEL', KEYS[4], 'finished', 'uniq')
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[4], 'score'), ARGV[1])
redis.call('ZADD', KEYS[3], 0, 'w')
return 'OK'
`)

// RetryDead puts a dead job back in the queue with its attempts reset;
// ErrJobNotFound when there is no dead job with id. A unique key it held
// was released when it died and is not taken again.
func (q *Queue) RetryDead(ctx context.Context, id string) error {
	return q.execByID(ctx, id, retryDeadScript, nil, q.keys.dead, q.keys.pending, q.keys.marker)
}

// deleteFinishedScript deletes a completed or dead job.
//
// KEYS[1] done, KEYS[2] dead, KEYS[3] the job's hash. ARGV[1] id. Returns
// "OK", "GONE" or "BUSY" (not finished).
var deleteFinishedScript = newPipelinedScript(`
local st = redis.call('HGET', KEYS[3], 'state')
if not st then return 'GONE' end
if st ~= 'completed' and st ~= 'dead' then return 'BUSY' end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 'OK'
`)

// DeleteJob deletes a completed or dead job: ErrJobNotFound when there is
// none, ErrJobNotCancellable when it has not finished (Cancel it).
func (q *Queue) DeleteJob(ctx context.Context, id string) error {
	return q.execByID(ctx, id, deleteFinishedScript, ErrJobNotCancellable, q.keys.done, q.keys.dead)
}

// purgeScript deletes up to 100 jobs of one state's sorted set.
//
// KEYS[1] the state's sorted set. ARGV[1] the prefix of job hashes (+ ID:
// the script's tag). Unique keys are read from the jobs (the script's
// tag). Returns how many it deleted.
var purgeScript = newPipelinedScript(luaPrelude + luaFence + `
local ids = redis.call('ZRANGE', KEYS[1], 0, 99)
for _, id in ipairs(ids) do
  local jk = ARGV[1] .. id
  release(jk, id)
  redis.call('DEL', jk)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
`)

// Purge deletes every job in state (not active: their workers hold them),
// 100 per script call so that Redis never runs a long script. It returns
// how many it deleted, also when it fails midway.
func (q *Queue) Purge(ctx context.Context, state JobState) (int, error) {
	z, ok := q.stateKey(state)
	if !ok || state == JobActive {
		return 0, fmt.Errorf("redisecho: cannot purge jobs in state %q", state)
	}
	total := 0
	for {
		n, err := q.b.ExecMulti(ctx, q.keys.pending, purgeScript, rueidis.LuaExec{Keys: []string{z}, Args: []string{q.keys.job}})[0].AsInt64()
		total += int(n)
		if err != nil || n < jobBatch {
			return total, err
		}
		if ctx.Err() != nil {
			return total, ctx.Err()
		}
	}
}

// Job is one attempt of a job, as a handler gets it.
type Job struct {
	// ID, Queue and Type name the job.
	ID, Queue, Type string
	// Payload is the job's payload as enqueued (Codec-encoded unless it
	// was []byte); Decode decodes it.
	Payload []byte
	// Attempt is this run's number, from 1; MaxAttempts the most it gets.
	Attempt, MaxAttempts int

	tok     int64
	q       *Queue
	w       *Worker
	timeout time.Duration
	backoff Backoff
	channel string
	wait    time.Duration // pickup latency
	trace   string        // the trace context it was enqueued under
}

// Decode decodes the payload into v through the queue's Codec (a *[]byte
// gets the bytes as they are).
func (j *Job) Decode(v any) error {
	if p, ok := v.(*[]byte); ok {
		*p = append((*p)[:0], j.Payload...)
		return nil
	}
	return j.q.codec.Unmarshal(j.Payload, v)
}

// encodeValue encodes a result or progress value: []byte as is, nil as
// nothing, anything else through the Codec.
func (q *Queue) encodeValue(v any) ([]byte, error) {
	switch x := v.(type) {
	case nil:
		return nil, nil
	case []byte:
		return x, nil
	}
	return q.codec.Marshal(v)
}

// Progress stores v (at most MaxJobProgressBytes once encoded) as the
// job's progress and reports a progress event. It is fenced: a worker
// that lost the lease gets ErrLeaseLost and nothing is stored.
func (j *Job) Progress(ctx context.Context, v any) error {
	data, err := j.q.encodeValue(v)
	if err != nil {
		return err
	}
	if len(data) > MaxJobProgressBytes {
		return ErrProgressTooLarge
	}
	if err := j.q.progress(ctx, j.ID, j.tok, data); err != nil {
		return err
	}
	if j.w != nil {
		j.w.emit(j, JobEvent{Kind: "progress", Data: data})
	}
	return nil
}

// JobHandler runs jobs, as http.Handler serves requests. Its result (nil,
// []byte, or a value for the Codec, at most MaxJobResultBytes) is stored
// with the completed job. An error fails the attempt: retried with
// backoff, or dead after the last attempt or when it wraps ErrSkipRetry.
// The context ends when the lease is lost, the job's timeout passes, or a
// Shutdown gives up waiting.
type JobHandler interface {
	ProcessJob(ctx context.Context, job *Job) (result any, err error)
}

// JobHandlerFunc adapts a function to JobHandler.
type JobHandlerFunc func(ctx context.Context, job *Job) (any, error)

// ProcessJob calls f.
func (f JobHandlerFunc) ProcessJob(ctx context.Context, job *Job) (any, error) { return f(ctx, job) }

// JobMux routes jobs to handlers by type, as http.ServeMux routes by path.
// A type with no handler fails with ErrNoJobHandler: the worker puts the
// job back (a rolling deploy may bring its handler).
type JobMux struct {
	mu sync.RWMutex
	m  map[string]JobHandler
}

// NewJobMux returns an empty JobMux.
func NewJobMux() *JobMux { return &JobMux{m: map[string]JobHandler{}} }

// Handle registers h for jobType, replacing any earlier one.
func (m *JobMux) Handle(jobType string, h JobHandler) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.m[jobType] = h
}

// HandleFunc registers f for jobType.
func (m *JobMux) HandleFunc(jobType string, f func(ctx context.Context, job *Job) (any, error)) {
	m.Handle(jobType, JobHandlerFunc(f))
}

// ProcessJob runs the handler of job's type.
func (m *JobMux) ProcessJob(ctx context.Context, job *Job) (any, error) {
	m.mu.RLock()
	h, ok := m.m[job.Type]
	m.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrNoJobHandler, job.Type)
	}
	return h.ProcessJob(ctx, job)
}

// WorkerQueue is one queue a Worker consumes, with how many of its jobs
// run at once.
type WorkerQueue struct {
	Queue *Queue
	// Concurrency is how many of the queue's jobs run at once. Default:
	// DefaultWorkerConcurrency (10).
	Concurrency int
}

// WorkerConfig configures a Worker.
type WorkerConfig struct {
	// Queues are the queues to consume. Required.
	Queues []WorkerQueue
	// Handler runs the jobs (a JobMux, usually). Required.
	Handler JobHandler
	// Lease is how long a job stays claimed without a heartbeat; the
	// worker renews it every third of it. Default: DefaultJobLease (30 s).
	Lease time.Duration
	// ReapInterval is how often the worker offers to return the jobs
	// whose lease expired (one worker does, per interval). Default:
	// DefaultReapInterval (5 s).
	ReapInterval time.Duration
	// StallLimit is how many expired leases send a job to the dead set
	// as stalled. Default: DefaultStallLimit (3).
	StallLimit int
	// UnknownTypeDelay and UnknownTypeLimit: a job of a type the handler
	// does not know (ErrNoJobHandler) is put back after the delay, without
	// counting an attempt, and dies after the limit. Defaults:
	// DefaultUnknownTypeDelay (10 s), DefaultUnknownTypeLimit (10).
	UnknownTypeDelay time.Duration
	UnknownTypeLimit int
	// RetryDelay, when set, computes the delay before a failed job's next
	// attempt instead of the job's Backoff. If it panics, the panic is
	// logged and the job's Backoff decides. Default: nil.
	RetryDelay func(job *Job, err error) time.Duration
	// OnEvent, when set, gets every event of the jobs this worker runs
	// (progress, completed, failed, dead), in the job's goroutine: keep it
	// short. A panic in it is logged and recovered. Default: nil.
	OnEvent func(JobEvent)
	// Logger logs panics and Redis trouble. Default: the first queue's.
	Logger *slog.Logger
}

// JobEvent is what happened to a job, as WorkerConfig.OnEvent and the hub
// channel of a job with a JobChannel see it.
type JobEvent struct {
	// Kind is "progress", "completed", "failed" (every failed attempt) or
	// "dead".
	Kind               string
	Queue, JobID, Type string
	Attempt            int
	WillRetry          bool
	RetryAt            time.Time
	Error              string
	// Data is the progress value or the result, encoded.
	Data []byte
}

// Worker consumes queues: it claims jobs with a lease, runs them, renews
// their leases, records their outcome, and returns the jobs of workers
// that vanished. Build it with NewWorker, then Start and Shutdown.
type Worker struct {
	cfg    WorkerConfig
	log    *slog.Logger
	queues []*workerQueue

	mu       sync.Mutex
	started  bool
	stop     context.Context // ends when Shutdown starts: no more claims
	stopNow  context.CancelFunc
	hard     context.Context // ends when Shutdown gives up: handlers cancelled
	hardStop context.CancelCauseFunc
	fetchers sync.WaitGroup // fetchers: the only ones that start jobs
	loops    sync.WaitGroup // heartbeats, reapers
	jobs     sync.WaitGroup // running jobs
}

// workerQueue is a Worker's state for one queue.
type workerQueue struct {
	w    *Worker
	q    *Queue
	conc int
	wake chan struct{} // a slot freed

	mu sync.Mutex
	// running is keyed by lease, not ID: the same job can be claimed
	// again (retried at once, or reaped) while the goroutine of its last
	// run still winds down.
	running map[jobLease]*runningJob
}

// runningJob is a job a worker runs.
type runningJob struct {
	job      *Job
	cancel   context.CancelCauseFunc
	deadline atomic.Int64 // unix nanos: when the lease ends, as far as this process knows
	// settled: whoever sets it first owns the job's outcome: Shutdown
	// (it gives the job back) or the run whose handler returned (it
	// records the outcome), never both.
	settled atomic.Bool
	// lost: the lease was found lost (counted once, however many
	// places notice it).
	lost atomic.Bool
	// hold (unix nanos, 0: none) keeps a transition retrying past the
	// lease: a completion that may have claimed the next job retries
	// until that job's lease would end, so a lost reply does not strand
	// it (a repeat hands it back).
	hold atomic.Int64
}

// loseLease cancels r's handler with ErrLeaseLost and counts the loss,
// once per run.
func (wq *workerQueue) loseLease(r *runningJob) {
	if r.lost.CompareAndSwap(false, true) {
		wq.q.stats.leasesLost.Add(1)
		wq.q.b.observe(Observation{Kind: ObsJobLeaseLost, Name: wq.q.cfg.Name, N: 1})
	}
	r.cancel(ErrLeaseLost)
}

var (
	errJobTimeout      = errors.New("redisecho: job timeout")
	errWorkerShutdown  = errors.New("redisecho: worker shutting down")
	blockTimeout       = 5 * time.Second
	maxFetchErrBackoff = 2 * time.Second
	// giveBackGrace is how long Shutdown keeps trying to give jobs back
	// once its ctx has ended.
	giveBackGrace = time.Second
)

// NewWorker validates cfg and fills its defaults. It does no I/O.
func NewWorker(cfg WorkerConfig) (*Worker, error) {
	if len(cfg.Queues) == 0 {
		return nil, errors.New("redisecho: worker: no queues")
	}
	if cfg.Handler == nil {
		return nil, errors.New("redisecho: worker: no handler")
	}
	if cfg.Lease <= 0 {
		cfg.Lease = DefaultJobLease
	}
	if cfg.Lease < 100*time.Millisecond {
		return nil, fmt.Errorf("redisecho: worker: lease %v is under 100ms", cfg.Lease)
	}
	if cfg.ReapInterval <= 0 {
		cfg.ReapInterval = DefaultReapInterval
	}
	if cfg.StallLimit <= 0 {
		cfg.StallLimit = DefaultStallLimit
	}
	if cfg.UnknownTypeDelay <= 0 {
		cfg.UnknownTypeDelay = DefaultUnknownTypeDelay
	}
	if cfg.UnknownTypeLimit <= 0 {
		cfg.UnknownTypeLimit = DefaultUnknownTypeLimit
	}
	w := &Worker{cfg: cfg, log: cfg.Logger}
	seen := map[*Queue]bool{}
	for _, wq := range cfg.Queues {
		if wq.Queue == nil {
			return nil, errors.New("redisecho: worker: nil queue")
		}
		if seen[wq.Queue] {
			return nil, fmt.Errorf("redisecho: worker: queue %q listed twice", wq.Queue.Name())
		}
		seen[wq.Queue] = true
		if wq.Concurrency <= 0 {
			wq.Concurrency = DefaultWorkerConcurrency
		}
		w.queues = append(w.queues, &workerQueue{w: w, q: wq.Queue, conc: wq.Concurrency, wake: make(chan struct{}, 1), running: map[jobLease]*runningJob{}})
	}
	if w.log == nil {
		w.log = cfg.Queues[0].Queue.b.log.logger
	}
	w.stop, w.stopNow = context.WithCancel(context.Background())
	w.hard, w.hardStop = context.WithCancelCause(context.Background())
	return w, nil
}

// Start starts fetching. It returns at once; ErrWorkerStarted when called
// twice.
func (w *Worker) Start() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.started {
		return ErrWorkerStarted
	}
	w.started = true
	for _, wq := range w.queues {
		w.fetchers.Add(1)
		w.loops.Add(2)
		go wq.fetch()
		go wq.heartbeats()
		go wq.reaper()
	}
	return nil
}

// Stats returns the sums of its queues' Stats.
func (w *Worker) Stats() JobStats {
	var s JobStats
	for _, wq := range w.queues {
		s = s.add(wq.q.Stats())
	}
	return s
}

// Shutdown stops claiming jobs and waits for the running ones until ctx
// ends; then it cancels them and returns them to their queue without
// counting the attempt, and returns ctx's error. Safe to call more than
// once.
func (w *Worker) Shutdown(ctx context.Context) error {
	w.stopNow()
	// The fetchers end promptly (a claim in flight is bounded by Timeout;
	// a wait is cancelled); once they have, no job starts, so the jobs'
	// WaitGroup is not added to while it is waited on, and the jobs they
	// claimed meanwhile (given back at once) are waited for too.
	w.fetchers.Wait()
	done := make(chan struct{})
	go func() { w.jobs.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		// Past ctx, a give-back gets a moment (giveBackGrace), not the
		// rest of the lease: a job not given back is reaped instead.
		until := time.Now().Add(giveBackGrace)
		var give sync.WaitGroup
		for _, wq := range w.queues {
			wq.mu.Lock()
			for _, r := range wq.running {
				if r.settled.Swap(true) {
					continue
				}
				r.cancel(errWorkerShutdown)
				give.Add(1)
				go func() {
					defer give.Done()
					wq.transitionBy(r, until, func(ctx context.Context) error { return wq.q.giveBack(ctx, r.job.ID, r.job.tok) })
				}()
			}
			wq.mu.Unlock()
		}
		give.Wait()
		// Runs that settled before ctx ended may still be recording their
		// outcome (and a completion may hand over a job, given back at
		// once): they get the same moment.
		select {
		case <-done:
		case <-time.After(time.Until(until)):
		}
	}
	// Handlers are cancelled (those still running past ctx), and the
	// heartbeats stop now rather than at their next tick.
	w.hardStop(errWorkerShutdown)
	w.loops.Wait()
	return err
}

// sleep waits d or until the worker stops; false when it stopped.
func (w *Worker) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-w.stop.Done():
		return false
	}
}

// idle returns how many more jobs the queue may run now.
func (wq *workerQueue) idle() int {
	wq.mu.Lock()
	defer wq.mu.Unlock()
	return wq.conc - len(wq.running)
}

// fetch claims jobs while slots are free, and blocks in Redis (BZPOPMIN
// on the marker) when there are none, with a Go timer armed at the next
// due time it knows: no polling.
func (wq *workerQueue) fetch() {
	defer wq.w.fetchers.Done()
	w := wq.w
	errWait := 50 * time.Millisecond
	fail := func(what string, err error) bool {
		if !errors.Is(err, ErrBreakerOpen) {
			w.log.Warn("redisecho: job worker: "+what+" failed; backing off", "queue", wq.q.Name(), "error", err, "retryIn", errWait)
		}
		ok := w.sleep(errWait)
		errWait = min(errWait*2, maxFetchErrBackoff)
		return ok
	}
	rearm := false // the last wait was abandoned: see claimRearm
	for w.stop.Err() == nil {
		idle := wq.idle()
		if idle <= 0 {
			select {
			case <-wq.wake:
			case <-w.stop.Done():
				return
			}
			continue
		}
		want := min(idle, maxClaim)
		sent := time.Now()
		c, err := wq.q.claimRearm(context.Background(), want, w.cfg.Lease, rearm)
		if err != nil {
			if !fail("claim", err) {
				return
			}
			continue
		}
		errWait = 50 * time.Millisecond
		rearm = false
		for _, j := range c.jobs {
			wq.start(j, sent)
		}
		if len(c.jobs) == want {
			continue // maybe more
		}
		if w.stop.Err() != nil {
			return
		}
		// Nothing more to claim now: block until an enqueue (or a retry,
		// a resume, a reaped job) wakes the marker, or the next due job.
		waitCtx, cancel := context.WithCancel(w.stop)
		var timer *time.Timer
		if !c.nextDue.IsZero() {
			timer = time.AfterFunc(max(c.nextDue.Sub(c.now), 0), cancel)
		}
		_, err = wq.q.wait(waitCtx, blockTimeout)
		if timer != nil {
			timer.Stop()
		}
		cancel()
		// Any error but the server's timeout (nil) means the call was
		// abandoned, possibly while still blocked in Redis.
		rearm = err != nil
		if err != nil && waitCtx.Err() == nil {
			if !fail("wait", err) {
				return
			}
		}
	}
}

// start runs a claimed job in its own goroutine.
func (wq *workerQueue) start(j *Job, claimedAt time.Time) {
	w := wq.w
	j.w = w
	ctx, cancel := context.WithCancelCause(w.hard)
	r := &runningJob{job: j, cancel: cancel}
	r.deadline.Store(claimedAt.Add(w.cfg.Lease).UnixNano())
	wq.mu.Lock()
	wq.running[jobLease{j.ID, j.tok}] = r
	wq.mu.Unlock()
	w.jobs.Add(1)
	if w.stop.Err() != nil {
		// Claimed while Shutdown started: back at once, no attempt.
		r.settled.Store(true)
		go func() {
			defer wq.done(r)
			wq.transition(r, func(ctx context.Context) error { return wq.q.giveBack(ctx, j.ID, j.tok) })
		}()
		return
	}
	go func() {
		defer wq.done(r)
		wq.run(ctx, r)
	}()
}

// done forgets a finished job and frees its slot.
func (wq *workerQueue) done(r *runningJob) {
	r.cancel(nil)
	wq.mu.Lock()
	delete(wq.running, jobLease{r.job.ID, r.job.tok})
	wq.mu.Unlock()
	select {
	case wq.wake <- struct{}{}:
	default:
	}
	wq.w.jobs.Done()
}

// call runs the handler, turning a panic into an error.
func (wq *workerQueue) call(ctx context.Context, j *Job) (res any, err error) {
	defer func() {
		if p := recover(); p != nil {
			wq.w.log.Error("redisecho: job handler panicked", "queue", j.Queue, "type", j.Type, "job", j.ID, "panic", p, "stack", string(debug.Stack()))
			res, err = nil, fmt.Errorf("panic: %v", p)
		}
	}()
	return wq.w.cfg.Handler.ProcessJob(ctx, j)
}

// run runs one attempt and records its outcome, under the attempt's span
// (the Tracer's, when there is one), ended with the attempt's error: nil
// once its completion is recorded.
func (wq *workerQueue) run(ctx context.Context, r *runningJob) {
	w, j, q := wq.w, r.job, wq.q
	sctx, end := q.b.startSpan(ctx, Span{Op: SpanJobAttempt, Name: q.cfg.Name, JobType: j.Type, JobID: j.ID, Attempt: j.Attempt, Link: j.trace})
	var spanErr error
	defer func() { end(spanErr) }()
	hctx := sctx
	if j.timeout > 0 {
		var cancel context.CancelFunc
		hctx, cancel = context.WithTimeoutCause(sctx, j.timeout, errJobTimeout)
		defer cancel()
	}
	var began time.Time
	if q.b.obs != nil {
		began = time.Now()
	}
	res, err := wq.call(hctx, j)
	var ran time.Duration
	if q.b.obs != nil {
		ran = time.Since(began)
	}
	if r.settled.Swap(true) {
		spanErr = errWorkerShutdown
		return // Shutdown gave it back
	}
	if errors.Is(context.Cause(ctx), ErrLeaseLost) {
		spanErr = ErrLeaseLost
		return // another worker has it; nothing of this attempt applies
	}
	var data []byte
	if err == nil {
		if data, err = q.encodeValue(res); err == nil && len(data) > MaxJobResultBytes {
			err = fmt.Errorf("%w: %d bytes", ErrResultTooLarge, len(data))
		}
	}
	if err == nil {
		// The completion also claims this slot's next job, unless the
		// worker is stopping: one round trip per job while the queue is
		// busy, and no claim script's fixed cost.
		var next *Job
		var sent time.Time
		spanErr = wq.transition(r, func(ctx context.Context) error {
			var e error
			sent = time.Now()
			claim := w.stop.Err() == nil
			if claim && r.hold.Load() == 0 {
				r.hold.Store(sent.Add(w.cfg.Lease).UnixNano())
			}
			next, e = q.complete(ctx, j.ID, j.tok, data, claim, w.cfg.Lease)
			return e
		})
		if spanErr == nil {
			q.stats.completed.Add(1)
			q.b.observe(Observation{Kind: ObsJobCompleted, Name: q.cfg.Name, N: 1, Duration: ran})
			if next != nil {
				wq.start(next, sent) // before this run's done: the slot passes on
			}
			w.emit(j, JobEvent{Kind: "completed", Data: data})
		}
		return
	}
	if errors.Is(context.Cause(hctx), errJobTimeout) && !errors.Is(err, errJobTimeout) {
		err = fmt.Errorf("timeout after %v: %w", j.timeout, err)
	}
	spanErr = err
	unknown := errors.Is(err, ErrNoJobHandler)
	delay := w.cfg.UnknownTypeDelay
	if !unknown {
		delay = wq.retryDelay(j, err)
	}
	var retry bool
	var at time.Time
	terr := wq.transition(r, func(ctx context.Context) error {
		var e error
		retry, at, e = q.fail(ctx, j.ID, j.tok, err.Error(), delay, errors.Is(err, ErrSkipRetry), unknown, w.cfg.UnknownTypeLimit)
		return e
	})
	if terr != nil {
		return
	}
	if !unknown {
		q.stats.failed.Add(1)
		q.b.observe(Observation{Kind: ObsJobFailed, Name: q.cfg.Name, N: 1, Duration: ran})
	}
	w.emit(j, JobEvent{Kind: "failed", WillRetry: retry, RetryAt: at, Error: err.Error()})
	if retry {
		q.stats.retried.Add(1)
		q.b.observe(Observation{Kind: ObsJobRetried, Name: q.cfg.Name, N: 1})
		return
	}
	q.stats.dead.Add(1)
	q.b.observe(Observation{Kind: ObsJobDead, Name: q.cfg.Name, N: 1})
	w.emit(j, JobEvent{Kind: "dead", Error: err.Error()})
}

// retryDelay is WorkerConfig.RetryDelay's answer for j's failure err, or
// j's Backoff when there is no RetryDelay or it panics.
func (wq *workerQueue) retryDelay(j *Job, err error) (d time.Duration) {
	if wq.w.cfg.RetryDelay != nil {
		ok := false
		func() {
			defer func() {
				if p := recover(); p != nil {
					wq.w.log.Error("redisecho: job worker: RetryDelay panicked; using the job's backoff", "queue", j.Queue, "type", j.Type, "job", j.ID, "panic", p, "stack", string(debug.Stack()))
				}
			}()
			d, ok = wq.w.cfg.RetryDelay(j, err), true
		}()
		if ok {
			return d
		}
	}
	return j.backoff.Delay(j.Attempt, mrand.Float64())
}

// transition applies fn, retrying while Redis fails and the lease lasts: the
// scripts are idempotent per token, so a retry after a lost reply applies
// once. ErrLeaseLost ends it (counted); so does the lease's end.
func (wq *workerQueue) transition(r *runningJob, fn func(ctx context.Context) error) error {
	return wq.transitionBy(r, time.Time{}, fn)
}

// transitionBy is transition that also gives up at until (zero: never).
func (wq *workerQueue) transitionBy(r *runningJob, until time.Time, fn func(ctx context.Context) error) error {
	wait := 10 * time.Millisecond
	for {
		err := fn(context.Background())
		switch {
		case err == nil:
			return nil
		case errors.Is(err, ErrLeaseLost):
			wq.loseLease(r)
			return err
		}
		next := time.Now().Add(wait)
		if next.UnixNano() > max(r.deadline.Load(), r.hold.Load()) || !until.IsZero() && next.After(until) {
			wq.w.log.Warn("redisecho: job worker: could not record a job's outcome before its lease ended; it will be reaped and run again",
				"queue", wq.q.Name(), "job", r.job.ID, "error", err)
			return err
		}
		time.Sleep(wait)
		wait = min(wait*2, 500*time.Millisecond)
	}
}

// heartbeats renews the leases of the running jobs every third of the
// lease, in one script call, and cancels the jobs whose lease was lost.
func (wq *workerQueue) heartbeats() {
	defer wq.w.loops.Done()
	w := wq.w
	t := time.NewTicker(w.cfg.Lease / 3)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-w.hard.Done():
			return
		case <-w.stop.Done():
			if wq.idle() == wq.conc {
				return
			}
			select {
			case <-t.C:
			case <-w.hard.Done():
				return
			}
		}
		wq.mu.Lock()
		leases := make([]jobLease, 0, len(wq.running))
		byLease := make(map[jobLease]*runningJob, len(wq.running))
		for l, r := range wq.running {
			leases = append(leases, l)
			byLease[l] = r
		}
		wq.mu.Unlock()
		if len(leases) == 0 {
			continue
		}
		sent := time.Now()
		lost, err := wq.q.heartbeat(context.Background(), w.cfg.Lease, leases)
		if err != nil {
			// The next beat tries again; a lease has two more. But a
			// job whose lease ran out by this process's own reckoning
			// may have been reaped and be running elsewhere already:
			// stop it rather than wait for Redis to say so.
			// (A settled run counts its own loss, from its transition.)
			now := time.Now().UnixNano()
			for _, r := range byLease {
				if now > r.deadline.Load() && !r.settled.Load() {
					wq.loseLease(r)
				}
			}
			continue
		}
		gone := make(map[jobLease]bool, len(lost))
		for _, l := range lost {
			gone[l] = true
			// A settled run may have just recorded its outcome (the
			// job is no longer active for that reason): it counts its
			// own loss, from its transition's answer.
			if r := byLease[l]; r != nil && !r.settled.Load() {
				wq.loseLease(r)
			}
		}
		for l, r := range byLease {
			if !gone[l] {
				r.deadline.Store(sent.Add(w.cfg.Lease).UnixNano())
			}
		}
	}
}

// reaper offers to return expired leases every ReapInterval (with a
// little jitter); the lock in Redis lets one worker do it per interval.
func (wq *workerQueue) reaper() {
	defer wq.w.loops.Done()
	w := wq.w
	for {
		d := w.cfg.ReapInterval + time.Duration(mrand.Int64N(int64(w.cfg.ReapInterval)/10+1))
		if !w.sleep(d) {
			return
		}
		for range 10 { // at most 10 batches of 100 per interval
			n, _, err := wq.q.reap(context.Background(), w.cfg.ReapInterval, w.cfg.StallLimit)
			if err != nil || n < jobBatch {
				break
			}
			// A full batch: release the lock's hold for the next batch.
			if wq.q.b.Do(context.Background(), wq.q.keys.reaper, wq.q.b.client.B().Del().Key(wq.q.keys.reaper).Build()).Error() != nil {
				break
			}
		}
	}
}

// emit hands ev to OnEvent and, for a job with a channel on a queue with
// a hub, publishes it as "job:" + kind.
func (w *Worker) emit(j *Job, ev JobEvent) {
	ev.Queue, ev.JobID, ev.Type, ev.Attempt = j.Queue, j.ID, j.Type, j.Attempt
	if w.cfg.OnEvent != nil {
		func() {
			defer func() {
				if p := recover(); p != nil {
					w.log.Error("redisecho: job worker: OnEvent panicked", "queue", ev.Queue, "event", ev.Kind, "job", ev.JobID, "panic", p, "stack", string(debug.Stack()))
				}
			}()
			w.cfg.OnEvent(ev)
		}()
	}
	if j.q.hub == nil || j.channel == "" {
		return
	}
	body := map[string]any{"id": ev.JobID, "queue": ev.Queue, "type": ev.Type, "attempt": ev.Attempt}
	switch ev.Kind {
	case "failed":
		body["willRetry"] = ev.WillRetry
		if ev.WillRetry {
			body["retryAt"] = ev.RetryAt.UTC().Format(time.RFC3339Nano)
		}
		body["error"] = ev.Error
	case "dead":
		body["error"] = ev.Error
	case "progress", "completed":
		key := "progress"
		if ev.Kind == "completed" {
			key = "result"
		}
		if len(ev.Data) > 0 && json.Valid(ev.Data) {
			body[key] = json.RawMessage(ev.Data)
		} else if len(ev.Data) > 0 {
			body[key] = string(ev.Data)
		}
	}
	data, err := json.Marshal(body)
	if err != nil {
		return
	}
	if _, err := j.q.hub.Publish(context.Background(), j.channel, Event{Name: "job:" + ev.Kind, Data: data}); err != nil {
		w.log.Warn("redisecho: job worker: could not publish a job event (the job's state in Redis is the truth)", "queue", j.Queue, "job", j.ID, "event", ev.Kind, "error", err)
	}
}

// JobInspectorConfig configures the read side of the inspector as a JSON
// HTTP handler. Mount it behind the app's own authorization, on a path
// ending in a wildcard: e.GET("/admin/jobs/*", redisecho.JobInspector(q)).
//
//	GET <mount>/                         {"queues":[{"name","counts","paused"}]}
//	GET <mount>/<queue>                  {"name","counts","paused"}
//	GET <mount>/<queue>/<state>?offset=&limit=
//	                                     {"jobs":[JobInfo...]} (limit default 50, at most MaxJobsPage)
//	GET <mount>/<queue>/jobs/<id>        JobInfo, with "payload", "progress" and "result"
//
// Unknown queues, states and jobs are 404, bad paging 400, Redis trouble
// 503 with no internal text. The write side (RetryDead, DeleteJob, Purge,
// Cancel, Pause, Resume) stays in Go, for the app to expose with its own
// checks (see the example's POST /api/jobs/:id/retry).
type JobInspectorConfig struct {
	// Queues are the queues shown. Required.
	Queues []*Queue
	// Param is the Echo path parameter holding the path below the mount.
	// Default: "*".
	Param string
}

// JobInspector returns the inspector's handler for queues.
func JobInspector(queues ...*Queue) echo.HandlerFunc {
	return JobInspectorWithConfig(JobInspectorConfig{Queues: queues})
}

// JobInspectorWithConfig is JobInspector with a config; it panics on a bad
// one (ToHandler returns the error).
func JobInspectorWithConfig(cfg JobInspectorConfig) echo.HandlerFunc {
	return must(cfg.ToHandler())
}

// ToHandler validates cfg and returns the handler.
func (cfg JobInspectorConfig) ToHandler() (echo.HandlerFunc, error) {
	if len(cfg.Queues) == 0 {
		return nil, errors.New("redisecho: JobInspectorConfig.Queues is required")
	}
	if cfg.Param == "" {
		cfg.Param = "*"
	}
	ins := &jobInspector{byName: map[string]*Queue{}}
	for _, q := range cfg.Queues {
		if q == nil {
			return nil, errors.New("redisecho: JobInspectorConfig: nil queue")
		}
		ins.order = append(ins.order, q)
		ins.byName[q.Name()] = q
	}
	return func(c echo.Context) error {
		ins.serve(c.Response(), c.Request(), c.Param(cfg.Param))
		return nil
	}, nil
}

// jobInspector serves the inspector over net/http types; the Echo handler
// only hands it the path below its mount.
type jobInspector struct {
	order  []*Queue
	byName map[string]*Queue
}

// jobInfoJSON is JobInfo with its stored values: JSON as it is, anything
// else as a string.
type jobInfoJSON struct {
	JobInfo
	Payload  json.RawMessage `json:"payload,omitempty"`
	Progress json.RawMessage `json:"progress,omitempty"`
	Result   json.RawMessage `json:"result,omitempty"`
}

func rawJSON(b []byte) json.RawMessage {
	if len(b) == 0 {
		return nil
	}
	if json.Valid(b) {
		return b
	}
	s, _ := json.Marshal(string(b))
	return s
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func (ins *jobInspector) serve(w http.ResponseWriter, r *http.Request, path string) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "method not allowed"})
		return
	}
	ctx := r.Context()
	unavailable := func() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "job queue unavailable"})
	}
	notFound := func(what string) { writeJSON(w, http.StatusNotFound, map[string]string{"error": what + " not found"}) }
	type queueView struct {
		Name   string    `json:"name"`
		Counts JobCounts `json:"counts"`
		Paused bool      `json:"paused"`
	}
	view := func(q *Queue) (queueView, error) {
		counts, err := q.Counts(ctx)
		if err != nil {
			return queueView{}, err
		}
		paused, err := q.Paused(ctx)
		return queueView{Name: q.Name(), Counts: counts, Paused: paused}, err
	}
	parts := strings.Split(strings.Trim(path, "/"), "/")
	if parts[0] == "" {
		out := make([]queueView, 0, len(ins.order))
		for _, q := range ins.order {
			v, err := view(q)
			if err != nil {
				unavailable()
				return
			}
			out = append(out, v)
		}
		writeJSON(w, http.StatusOK, map[string]any{"queues": out})
		return
	}
	q, ok := ins.byName[parts[0]]
	if !ok {
		notFound("queue")
		return
	}
	switch {
	case len(parts) == 1:
		v, err := view(q)
		if err != nil {
			unavailable()
			return
		}
		writeJSON(w, http.StatusOK, v)
	case len(parts) == 3 && parts[1] == "jobs":
		info, err := q.Job(ctx, parts[2])
		switch {
		case errors.Is(err, ErrJobNotFound):
			notFound("job")
		case err != nil:
			unavailable()
		default:
			writeJSON(w, http.StatusOK, jobInfoJSON{JobInfo: info, Payload: rawJSON(info.Payload), Progress: rawJSON(info.Progress), Result: rawJSON(info.Result)})
		}
	case len(parts) == 2:
		if _, ok := q.stateKey(JobState(parts[1])); !ok {
			notFound("state")
			return
		}
		offset, limit := 0, 50
		for _, p := range []struct {
			name string
			dst  *int
			max  int
		}{{"offset", &offset, math.MaxInt32}, {"limit", &limit, MaxJobsPage}} {
			if v := r.URL.Query().Get(p.name); v != "" {
				n, err := strconv.Atoi(v)
				if err != nil || n < 0 || n > p.max {
					writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("%s must be a number from 0 to %d", p.name, p.max)})
					return
				}
				*p.dst = n
			}
		}
		jobs, err := q.Jobs(ctx, JobState(parts[1]), offset, limit)
		if err != nil {
			unavailable()
			return
		}
		out := make([]jobInfoJSON, len(jobs))
		for i, j := range jobs {
			out[i] = jobInfoJSON{JobInfo: j, Progress: rawJSON(j.Progress), Result: rawJSON(j.Result)}
		}
		writeJSON(w, http.StatusOK, map[string]any{"jobs": out})
	default:
		notFound("page")
	}
}
