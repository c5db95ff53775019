package redisecho

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// jobStatsOf reads a recorder's job counts of queue as JobStats, to
// compare with Queue.Stats.
func jobStatsOf(rec *recorder, queue string) JobStats {
	c := func(k ObsKind) uint64 { return uint64(rec.countNamed(k, ResultNone, queue)) }
	return JobStats{
		Enqueued: c(ObsJobEnqueued), Started: c(ObsJobStarted), Completed: c(ObsJobCompleted), Failed: c(ObsJobFailed),
		Retried: c(ObsJobRetried), Dead: c(ObsJobDead), Reaped: c(ObsJobReaped), LeasesLost: c(ObsJobLeaseLost),
	}
}

// requireJobStats waits up to 5 s for rec's counts of q to reach want,
// then requires them, and q.Stats(), equal to want.
func requireJobStats(t *testing.T, rec *recorder, q *Queue, want JobStats) {
	t.Helper()
	require.Eventually(t, func() bool { return jobStatsOf(rec, q.Name()) == want && q.Stats() == want }, 5*time.Second, 5*time.Millisecond,
		"want %+v\nobserved %+v\nstats %+v\n%s", want, jobStatsOf(rec, q.Name()), q.Stats(), rec.dump())
	require.Equal(t, want, jobStatsOf(rec, q.Name()), rec.dump())
	require.Equal(t, q.Stats(), jobStatsOf(rec, q.Name()))
}

// TestObserveJobCounts: every job event is observed as the queue's Stats
// count it, under the queue's name: single and batch enqueues (a repeated
// JobID and a duplicate unique key are not enqueued), attempts that
// complete, fail and retry, fail and die, or skip their retries; run
// durations cover the handler.
func TestObserveJobCounts(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		rec := newRecorder()
		q := newTestQueue(t, r, r.Client(), "obs", func(c *QueueConfig) {
			c.Observer = rec
			c.MaxAttempts = 2
			c.Backoff = FixedBackoff(10 * time.Millisecond)
		})
		_, err := q.Enqueue(ctx, "ok", nil, JobID("fixed"))
		require.NoError(t, err)
		e, err := q.Enqueue(ctx, "ok", nil, JobID("fixed"))
		require.NoError(t, err)
		require.True(t, e.Existing)
		_, err = q.Enqueue(ctx, "fail", nil)
		require.NoError(t, err)
		_, err = q.Enqueue(ctx, "ok", nil, JobUniqueKey("u"))
		require.NoError(t, err)
		_, err = q.Enqueue(ctx, "ok", nil, JobUniqueKey("u"))
		var dup *DuplicateJobError
		require.ErrorAs(t, err, &dup)
		res, err := q.EnqueueBatch(ctx, []BatchJob{{Type: "ok"}, {Type: ""}, {Type: "ok"}, {Type: "fail"}, {Type: "skip"}})
		require.NoError(t, err)
		require.Error(t, res[1].Err)
		var sizes []int64
		for _, o := range rec.of(ObsJobEnqueued) {
			sizes = append(sizes, o.N)
		}
		require.Equal(t, []int64{1, 1, 1, 4}, sizes, "one observation per Enqueue, one per batch with N = jobs added")

		const sleep = 50 * time.Millisecond
		w := startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			time.Sleep(sleep)
			switch j.Type {
			case "fail":
				return nil, errors.New("boom")
			case "skip":
				return nil, fmt.Errorf("bad input: %w", ErrSkipRetry)
			}
			return "done", nil
		}), nil, q)

		// 4 complete; 2 fail twice (a retry, then dead); 1 fails once, dead.
		want := JobStats{Enqueued: 7, Started: 4 + 4 + 1, Completed: 4, Failed: 5, Retried: 2, Dead: 3}
		requireJobStats(t, rec, q, want)
		require.Equal(t, want, w.Stats())
		counts, err := q.Counts(ctx)
		require.NoError(t, err)
		require.Equal(t, JobCounts{Completed: 4, Dead: 3}, counts)

		rec.mu.Lock()
		all := append([]Observation(nil), rec.all...)
		rec.mu.Unlock()
		for _, o := range all {
			if o.Kind >= ObsJobEnqueued && o.Kind <= ObsJobLeaseLost {
				require.Equal(t, "obs", o.Name)
				require.Positive(t, o.N)
			}
		}
		for _, kind := range []ObsKind{ObsJobCompleted, ObsJobFailed} {
			for _, o := range rec.of(kind) {
				require.GreaterOrEqual(t, o.Duration, sleep, "%v: the run time covers the handler", kind)
				require.Less(t, o.Duration, 10*time.Second)
			}
		}
		for _, o := range rec.of(ObsJobStarted) {
			require.GreaterOrEqual(t, o.Duration, time.Duration(0))
		}
	})
}

// TestObserveJobPickupLatency: ObsJobStarted's Duration counts from when
// the job became due: its delay's end (not its enqueue), a run-at in the
// past, its retry time, its reap or give-back; the same through the
// claim a completion makes, and its repeat.
func TestObserveJobPickupLatency(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		rec := newRecorder()
		q := newTestQueue(t, r, r.Client(), "latency", func(c *QueueConfig) { c.Observer = rec })
		lastStart := func() time.Duration {
			t.Helper()
			s := rec.of(ObsJobStarted)
			require.NotEmpty(t, s)
			return s[len(s)-1].Duration
		}
		claimOne := func(lease time.Duration) *Job {
			t.Helper()
			c, err := q.claim(ctx, 1, lease)
			require.NoError(t, err)
			require.Len(t, c.jobs, 1)
			return c.jobs[0]
		}

		// A run-at an hour ago: due then, so waiting for an hour.
		_, err := q.Enqueue(ctx, "t", nil, JobRunAt(time.Now().Add(-time.Hour)))
		require.NoError(t, err)
		j := claimOne(100 * time.Millisecond)
		require.InDelta(t, time.Hour.Seconds(), lastStart().Seconds(), 60)

		// Reaped: due again from the reap.
		time.Sleep(150 * time.Millisecond)
		n, _, err := q.reap(ctx, time.Second, 10)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		j2 := claimOne(time.Minute)
		require.Equal(t, j.ID, j2.ID)
		require.Less(t, lastStart(), 30*time.Second, "counted from the reap")
		require.GreaterOrEqual(t, lastStart(), time.Duration(0))

		// A retry: due at its retry time (now, without a delay).
		retry, _, err := q.fail(ctx, j2.ID, j2.tok, "x", 0, false, false, 0)
		require.NoError(t, err)
		require.True(t, retry)
		j3 := claimOne(time.Minute)
		require.Less(t, lastStart(), 30*time.Second, "counted from the retry")

		// Given back: due again from then.
		require.NoError(t, q.giveBack(ctx, j3.ID, j3.tok))
		j4 := claimOne(time.Minute)
		require.Equal(t, j.ID, j4.ID)
		require.Less(t, lastStart(), 30*time.Second, "counted from the give-back")

		// The claim a completion makes, and its repeat (a lost reply),
		// which hands the same job back measured to its claim.
		_, err = q.Enqueue(ctx, "t", nil, JobRunAt(time.Now().Add(-time.Hour)))
		require.NoError(t, err)
		next, err := q.complete(ctx, j4.ID, j4.tok, nil, true, time.Minute)
		require.NoError(t, err)
		require.NotNil(t, next)
		require.InDelta(t, time.Hour.Seconds(), lastStart().Seconds(), 60)
		first := lastStart()
		time.Sleep(20 * time.Millisecond)
		again, err := q.complete(ctx, j4.ID, j4.tok, nil, true, time.Minute)
		require.NoError(t, err)
		require.NotNil(t, again)
		require.Equal(t, next.ID, again.ID)
		require.Equal(t, first.Milliseconds(), lastStart().Milliseconds(), "the repeat measures to the claim, not to itself")
		require.Equal(t, q.Stats(), jobStatsOf(rec, q.Name()))

		// Through a worker: a job delayed 200 ms waits little past its due
		// time (a loose bound: CI is loaded).
		rec.reset()
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) { return nil, nil }), nil, q)
		e, err := q.Enqueue(ctx, "t", nil, JobDelay(200*time.Millisecond))
		require.NoError(t, err)
		waitState(t, q, e.ID, JobCompleted, 10*time.Second)
		rec.requireCount(t, 1, ObsJobStarted, ResultNone)
		d := rec.of(ObsJobStarted)[0].Duration
		require.GreaterOrEqual(t, d, time.Duration(0))
		require.Less(t, d, 2*time.Second)
		t.Logf("pickup latency of a delayed job: %v", d)
	})
}

// TestObserveJobLeaseLostAndReaped: a worker whose job's lease is taken
// from it (its token moved on in Redis) observes the loss; the reaper
// returns the job, observed too, and it runs again. The lost attempt's
// span ends with ErrLeaseLost.
func TestObserveJobLeaseLostAndReaped(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.Background()
		tr := &jobTracer{recorder: newRecorder()}
		rec := tr.recorder
		client := r.Client()
		q := newTestQueue(t, r, client, "lost", func(c *QueueConfig) { c.Observer = tr })
		started := make(chan string, 1)
		var mu sync.Mutex
		runs := 0
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			mu.Lock()
			runs++
			first := runs == 1
			mu.Unlock()
			if !first {
				return "second", nil
			}
			started <- j.ID
			<-ctx.Done()
			return nil, ctx.Err()
		}), func(c *WorkerConfig) { c.Lease = 600 * time.Millisecond }, q)
		e, err := q.Enqueue(ctx, "t", nil)
		require.NoError(t, err)
		require.Equal(t, e.ID, <-started)
		jk := q.keys.job + e.ID
		require.NoError(t, client.Do(ctx, client.B().Hincrby().Key(jk).Field("tok").Increment(1).Build()).Error())
		waitState(t, q, e.ID, JobCompleted, 15*time.Second)
		requireJobStats(t, rec, q, JobStats{Enqueued: 1, Started: 2, Completed: 1, Reaped: 1, LeasesLost: 1})
		for attempt, want := range map[int]error{1: ErrLeaseLost, 2: nil} {
			require.Eventually(t, func() bool { _, _, done, _ := tr.span(e.ID, attempt); return done }, 5*time.Second, 5*time.Millisecond)
			_, _, _, err := tr.span(e.ID, attempt)
			require.Equal(t, want, err, "attempt %d", attempt)
		}
	})
}

// TestObserveQueueState: a StateObserver gets each Queue as it is built,
// also within Observers.
func TestObserveQueueState(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		st := &stateRecorder{recorder: newRecorder()}
		q := newTestQueue(t, r, r.Client(), "state", func(c *QueueConfig) { c.Observer = st })
		require.Equal(t, []*Queue{q}, st.queues)
		require.Len(t, st.breakers, 1)

		st2 := &stateRecorder{recorder: newRecorder()}
		q2 := newTestQueue(t, r, r.Client(), "state2", func(c *QueueConfig) { c.Observer = Observers(newRecorder(), st2) })
		require.Equal(t, []*Queue{q2}, st2.queues)
		require.Equal(t, []*Queue{q}, st.queues)

		// A plain Observer is not asked.
		newTestQueue(t, r, r.Client(), "state3", func(c *QueueConfig) { c.Observer = newRecorder() })
	})
}

// jobTraceKey holds, in a context, the trace text jobTracer's
// InjectTrace returns; jobSpanKey the index of the span jobTracer started.
type (
	jobTraceKey struct{}
	jobSpanKey  struct{}
)

// jobTracer is a Tracer that records its spans and how they ended; its
// InjectTrace returns the ctx's jobTraceKey text.
type jobTracer struct {
	*recorder
	mu    sync.Mutex
	spans []Span
	ended []error
	done  []bool
}

func (t *jobTracer) StartSpan(ctx context.Context, s Span) (context.Context, func(error)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	i := len(t.spans)
	t.spans = append(t.spans, s)
	t.ended = append(t.ended, nil)
	t.done = append(t.done, false)
	return context.WithValue(ctx, jobSpanKey{}, i), func(err error) {
		t.mu.Lock()
		defer t.mu.Unlock()
		t.ended[i], t.done[i] = err, true
	}
}

func (t *jobTracer) InjectTrace(ctx context.Context) string {
	s, _ := ctx.Value(jobTraceKey{}).(string)
	return s
}

// span returns the span of job id's attempt, whether it ended and how.
func (t *jobTracer) span(id string, attempt int) (Span, int, bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, s := range t.spans {
		if s.JobID == id && s.Attempt == attempt {
			return s, i, t.done[i], t.ended[i]
		}
	}
	return Span{}, -1, false, nil
}

// TestObserveJobTrace: Enqueue stores the enqueuing ctx's trace context
// with the job (not when empty or over 1 KiB); each attempt runs under
// its own span, linked to it, whose ctx the handler gets, ended with the
// attempt's error.
func TestObserveJobTrace(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		bg := context.Background()
		tr := &jobTracer{recorder: newRecorder()}
		client := r.Client()
		q := newTestQueue(t, r, client, "trace", func(c *QueueConfig) {
			c.Observer = tr
			c.MaxAttempts = 2
			c.Backoff = FixedBackoff(10 * time.Millisecond)
		})
		hasTC := func(id string) bool {
			t.Helper()
			ok, err := client.Do(bg, client.B().Hexists().Key(q.keys.job+id).Field("tc").Build()).AsBool()
			require.NoError(t, err)
			return ok
		}
		const tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
		one, err := q.Enqueue(context.WithValue(bg, jobTraceKey{}, tp), "ok", nil)
		require.NoError(t, err)
		flaky, err := q.Enqueue(context.WithValue(bg, jobTraceKey{}, tp+"-f"), "flaky", nil)
		require.NoError(t, err)
		res, err := q.EnqueueBatch(context.WithValue(bg, jobTraceKey{}, tp+"-b"), []BatchJob{{Type: "ok"}, {Type: "ok"}})
		require.NoError(t, err)
		long, err := q.Enqueue(context.WithValue(bg, jobTraceKey{}, strings.Repeat("x", 1025)), "ok", nil)
		require.NoError(t, err)
		edge, err := q.Enqueue(context.WithValue(bg, jobTraceKey{}, strings.Repeat("y", 1024)), "ok", nil)
		require.NoError(t, err)
		none, err := q.Enqueue(bg, "ok", nil)
		require.NoError(t, err)
		require.True(t, hasTC(one.ID))
		require.True(t, hasTC(edge.ID), "1 KiB is stored")
		require.False(t, hasTC(long.ID), "over 1 KiB is not")
		require.False(t, hasTC(none.ID), "an empty trace context is not")

		type seen struct {
			span  any
			valid bool
		}
		var mu sync.Mutex
		got := map[string][]seen{}
		startWorker(t, JobHandlerFunc(func(ctx context.Context, j *Job) (any, error) {
			mu.Lock()
			got[j.ID] = append(got[j.ID], seen{ctx.Value(jobSpanKey{}), ctx.Err() == nil})
			mu.Unlock()
			if j.Type == "flaky" && j.Attempt == 1 {
				return nil, errors.New("flaky")
			}
			return nil, nil
		}), nil, q)
		for _, id := range []string{one.ID, flaky.ID, res[0].ID, res[1].ID, long.ID, edge.ID, none.ID} {
			waitState(t, q, id, JobCompleted, 10*time.Second)
		}
		check := func(id, link string, attempt int, wantErr bool) {
			t.Helper()
			var s Span
			var i int
			var done bool
			var err error
			require.Eventually(t, func() bool { s, i, done, err = tr.span(id, attempt); return done }, 5*time.Second, 5*time.Millisecond,
				"the span of %s's attempt %d ends", id, attempt)
			require.Equal(t, Span{Op: SpanJobAttempt, Name: "trace", JobType: s.JobType, JobID: id, Attempt: attempt, Link: link}, s)
			require.NotEmpty(t, s.JobType)
			if wantErr {
				require.Error(t, err)
			} else {
				require.NoError(t, err)
			}
			mu.Lock()
			defer mu.Unlock()
			require.GreaterOrEqual(t, len(got[id]), attempt)
			require.Equal(t, i, got[id][attempt-1].span, "the handler runs in the attempt span's ctx")
		}
		check(one.ID, tp, 1, false)
		check(flaky.ID, tp+"-f", 1, true)
		check(flaky.ID, tp+"-f", 2, false)
		check(res[0].ID, tp+"-b", 1, false)
		check(res[1].ID, tp+"-b", 1, false)
		check(long.ID, "", 1, false)
		check(edge.ID, strings.Repeat("y", 1024), 1, false)
		check(none.ID, "", 1, false)
	})
}

// TestObserveJobNoTracer: without a Tracer nothing is stored with a job,
// and the handler runs in the worker's own ctx.
func TestObserveJobNoTracer(t *testing.T) {
	forEachTopology(t, func(t *testing.T, r *testRedis) {
		ctx := context.WithValue(context.Background(), jobTraceKey{}, "tp")
		client := r.Client()
		for _, obs := range []Observer{nil, newRecorder()} {
			q := newTestQueue(t, r, client, fmt.Sprintf("plain%v", obs != nil), func(c *QueueConfig) { c.Observer = obs })
			e, err := q.Enqueue(ctx, "t", nil)
			require.NoError(t, err)
			m, err := client.Do(ctx, client.B().Hgetall().Key(q.keys.job+e.ID).Build()).AsStrMap()
			require.NoError(t, err)
			require.NotEmpty(t, m)
			require.NotContains(t, m, "tc")
			c, err := q.claim(ctx, 1, time.Minute)
			require.NoError(t, err)
			require.Len(t, c.jobs, 1)
			require.Empty(t, c.jobs[0].trace)
		}
	})
}
