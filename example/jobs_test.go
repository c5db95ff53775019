package main

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// jobsEnv is realtimeEnv with JOB_WORKERS set to workers.
func jobsEnv(redisURL string, workers string) map[string]string {
	env := realtimeEnv(redisURL)
	env["JOB_WORKERS"] = workers
	return env
}

// waitJob polls GET /api/jobs/:id as c until the job's state is want, and
// returns the last view.
func waitJob(t *testing.T, c *client, id, want string, within time.Duration) map[string]any {
	t.Helper()
	var last map[string]any
	require.Eventually(t, func() bool {
		code, out := c.call(http.MethodGet, "/api/jobs/"+id, "")
		last = out
		return code == http.StatusOK && out["state"] == want
	}, within, 200*time.Millisecond, "job %s never reached %s (polled every 200 ms: the /api limiter allows 100 a minute)", id, want)
	return last
}

// sendEmail posts an email as c and returns the job's ID.
func sendEmail(t *testing.T, c *client, to string) string {
	t.Helper()
	code, out := c.call(http.MethodPost, "/api/emails", fmt.Sprintf(`{"to":%q,"subject":"hi","body":"hello"}`, to))
	require.Equal(t, http.StatusAccepted, code, "POST /api/emails: %v", out)
	id, _ := out["id"].(string)
	require.NotEmpty(t, id)
	return id
}

// TestEmailQueue walks the guide's email queue: a valid email is accepted
// with its job's ID and sent by the worker, with the guide's result; a bad
// address is refused; an address that always fails is retried with backoff
// and lands in the dead set with its error, from where alice (only) can
// retry it; the counts say where the jobs are.
func TestEmailQueue(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, jobsEnv(redisURL, "5"))
		ips := newClientIPs()
		anon := visitor(t, base, ips)

		for _, body := range []string{`{"to":"nobody","subject":"s","body":"b"}`, `{"to":1}`, `[]`, `{"to":"a@b","extra":1}`} {
			code, _ := anon.call(http.MethodPost, "/api/emails", body)
			require.Equal(t, http.StatusBadRequest, code, body)
		}

		id := sendEmail(t, anon, "carol@example.com")
		v := waitJob(t, anon, id, "completed", 10*time.Second)
		require.Equal(t, "send-email", v["type"])
		require.Equal(t, float64(1), v["attempts"])
		require.Equal(t, float64(3), v["maxAttempts"])
		require.Equal(t, map[string]any{"sent": true}, v["result"])
		require.Equal(t, "", v["error"])

		start := time.Now()
		dead := sendEmail(t, anon, "fail@example.com")
		v = waitJob(t, anon, dead, "dead", 20*time.Second)
		require.Equal(t, float64(3), v["attempts"], "the guide's 3 attempts")
		require.Contains(t, v["error"], "refused")
		// Backoff from 1 s, doubling: at least about 1 s + 2 s between the
		// three attempts (jitter may shorten each by a fifth).
		require.Greater(t, time.Since(start), 2*time.Second)

		code, counts := anon.call(http.MethodGet, "/api/jobs", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, float64(1), counts["completed"])
		require.Equal(t, float64(1), counts["dead"])

		code, _ = anon.call(http.MethodPost, "/api/jobs/"+dead+"/retry", "")
		require.Equal(t, http.StatusUnauthorized, code)
		code, _ = member(t, base, "bob", ips).call(http.MethodPost, "/api/jobs/"+dead+"/retry", "")
		require.Equal(t, http.StatusForbidden, code)
		alice := member(t, base, "alice", ips)
		code, _ = alice.call(http.MethodPost, "/api/jobs/"+id+"/retry", "")
		require.Equal(t, http.StatusNotFound, code, "a completed job is not dead")
		code, _ = alice.call(http.MethodPost, "/api/jobs/"+dead+"/retry", "")
		require.Equal(t, http.StatusOK, code)
		code, v = anon.call(http.MethodGet, "/api/jobs/"+dead, "")
		require.Equal(t, http.StatusOK, code)
		require.Contains(t, []any{"pending", "active", "retrying"}, v["state"], "retried")
	})
}

// TestJobVisibility: a logged-in user's job is readable by that user and
// alice only (anyone else gets the 404 of an unknown job); an anonymous job
// by whoever holds its ID; unknown and malformed IDs are 404.
func TestJobVisibility(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, jobsEnv(redisURL, "0")) // no worker: the jobs stay pending
		ips := newClientIPs()
		bob, alice, anon := member(t, base, "bob", ips), member(t, base, "alice", ips), visitor(t, base, ips)
		bobs := sendEmail(t, bob, "x@example.com")
		anons := sendEmail(t, anon, "y@example.com")
		for _, tt := range []struct {
			name string
			c    *client
			id   string
			want int
		}{
			{"bob reads his job", bob, bobs, http.StatusOK},
			{"alice reads bob's job", alice, bobs, http.StatusOK},
			{"an anonymous visitor cannot", anon, bobs, http.StatusNotFound},
			{"anyone reads an anonymous job", bob, anons, http.StatusOK},
			{"unknown", bob, "AAAAAAAAAAAAAAAAAAAAAA", http.StatusNotFound},
			{"malformed", bob, "x%7B%7D", http.StatusNotFound},
			{"too long", bob, strings.Repeat("a", 300), http.StatusNotFound},
		} {
			t.Run(tt.name, func(t *testing.T) {
				code, out := tt.c.call(http.MethodGet, "/api/jobs/"+tt.id, "")
				require.Equal(t, tt.want, code, "%v", out)
				if code == http.StatusOK {
					require.Equal(t, "pending", out["state"])
				}
			})
		}
	})
}

// TestEmailWorkerElsewhere: with JOB_WORKERS=0 the web app only enqueues;
// another instance with a worker (on the same Redis) sends the email, and
// its events reach the user's stream on the first instance.
func TestEmailWorkerElsewhere(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		web := startReady(t, jobsEnv(redisURL, "0"))
		ips := newClientIPs()
		bob := member(t, web, "bob", ips)
		s := bob.stream("rooms=lobby", "")
		s.expectJoined("lobby", "bob")
		id := sendEmail(t, bob, "z@example.com")
		time.Sleep(200 * time.Millisecond)
		code, v := bob.call(http.MethodGet, "/api/jobs/"+id, "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "pending", v["state"], "no worker here")

		startReady(t, jobsEnv(redisURL, "2"))
		require.Equal(t, id, s.expect("job:progress")["id"])
		require.Equal(t, id, s.expect("job:completed")["id"])
		waitJob(t, bob, id, "completed", 5*time.Second)
	})
}

// TestEmailPayloadBound: an email over the queue's payload bound gets 413
// from the queue's typed error, and nothing is enqueued.
func TestEmailPayloadBound(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, jobsEnv(redisURL, "0"))
		c := visitor(t, base, newClientIPs())
		big := strings.Repeat("a", maxEmailBody-200)
		code, out := c.call(http.MethodPost, "/api/emails", fmt.Sprintf(`{"to":"a@b","subject":"s","body":%q}`, big))
		require.Equal(t, http.StatusRequestEntityTooLarge, code, "%v", out)
		code, counts := c.call(http.MethodGet, "/api/jobs", "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, float64(0), counts["pending"])
	})
}

// TestJobConfig: JOB_WORKERS and JOB_LEASE are checked at start.
func TestJobConfig(t *testing.T) {
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"JOB_WORKERS": "-1"}, "JOB_WORKERS"},
		{map[string]string{"JOB_WORKERS": "many"}, "JOB_WORKERS"},
		{map[string]string{"JOB_LEASE": "10ms"}, "JOB_LEASE"},
		{map[string]string{"JOB_LEASE": "soon"}, "JOB_LEASE"},
	} {
		_, err := loadConfig(envOf(tt.env), discardLogger())
		require.ErrorContains(t, err, tt.want, "%v", tt.env)
	}
	cfg, err := loadConfig(envOf(map[string]string{}), discardLogger())
	require.NoError(t, err)
	require.Equal(t, defaultJobWorkers, cfg.jobWorkers)
	cfg, err = loadConfig(envOf(map[string]string{"JOB_WORKERS": "0", "JOB_LEASE": "5s"}), discardLogger())
	require.NoError(t, err)
	require.Equal(t, 0, cfg.jobWorkers)
	require.Equal(t, 5*time.Second, cfg.jobLease)
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestEmailQueueEmbeddedRedis: the queue and its worker run on the embedded
// default Redis too (miniredis: no client-side caching, RESP2).
func TestEmailQueueEmbeddedRedis(t *testing.T) {
	env := jobsEnv("", "2")
	delete(env, "REDIS_URL")
	base := startReady(t, env)
	c := visitor(t, base, newClientIPs())
	id := sendEmail(t, c, "embedded@example.com")
	v := waitJob(t, c, id, "completed", 10*time.Second)
	require.Equal(t, map[string]any{"sent": true}, v["result"])
}
