package main

// The guide's "Job Queue with BullMQ": an email queue on redisecho's Queue
// and Worker, with the guide's options (3 attempts, exponential backoff
// from 1 s, concurrency 5).
//
//	POST /api/emails           {"to","subject","body"}: 202 {"id"}; 400 when
//	                           "to" has no '@'; 413 over the payload bound
//	GET  /api/jobs/:id         {"id","type","state","attempts","maxAttempts",
//	                           "error","result"}; a logged-in user's job is
//	                           readable by that user and alice only, an
//	                           anonymous one by whoever holds its ID; 404
//	                           for an unknown or malformed ID
//	GET  /api/jobs             the counts per state
//	POST /api/jobs/:id/retry   alice only: re-queues a dead job
//
// A logged-in user's jobs report job:progress, job:completed and job:failed
// on the user's channel, user:<id>, which their page's stream (GET /events)
// receives. The demo sender takes about 20 ms and records each sent email in
// Redis (the newest maxSentEmails); every attempt for an address that
// starts with "fail@" fails, so that retries and the dead set can be seen.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/redis/rueidis"

	"github.com/redisecho/redisecho"
)

const (
	// emailQueue is the guide's queue name.
	emailQueue = "emails"
	// emailJob is the guide's job type.
	emailJob = "send-email"
	// maxEmailBody is the body limit of POST /api/emails: the queue's
	// payload bound, and room for the JSON around it, so that a payload
	// over the bound reaches the queue and gets its typed error (413).
	maxEmailBody = redisecho.DefaultMaxPayloadBytes + 1024
	// defaultJobWorkers is the worker's concurrency (the guide's 5).
	defaultJobWorkers = 5
	// sentEmailsKey lists the demo sender's sent emails, newest first.
	sentEmailsKey = "example:sent-emails"
	// maxSentEmails bounds that list.
	maxSentEmails = 1000
	// sendTime is how long the demo sender takes.
	sendTime = 20 * time.Millisecond
)

// email is the payload of a send-email job.
type email struct {
	To      string `json:"to"`
	Subject string `json:"subject"`
	Body    string `json:"body"`
}

// jobs is the email queue and, unless JOB_WORKERS is 0, its worker.
type jobs struct {
	queue  *redisecho.Queue
	worker *redisecho.Worker // nil: another process works the queue
	client rueidis.Client
	logger *slog.Logger
}

// newJobs builds the queue and the worker. It does no I/O; start starts
// the worker.
func newJobs(client rueidis.Client, opts redisecho.Options, hub *redisecho.Hub, workers int, lease time.Duration, logger *slog.Logger) (*jobs, error) {
	q, err := redisecho.NewQueue(redisecho.QueueConfig{
		Client:      client,
		Options:     opts,
		Name:        emailQueue,
		MaxAttempts: 3,
		Backoff:     redisecho.ExponentialBackoff(time.Second, time.Minute),
		Hub:         hub,
	})
	if err != nil {
		return nil, err
	}
	j := &jobs{queue: q, client: client, logger: logger}
	if workers == 0 {
		return j, nil
	}
	mux := redisecho.NewJobMux()
	mux.HandleFunc(emailJob, j.sendEmail)
	j.worker, err = redisecho.NewWorker(redisecho.WorkerConfig{
		Queues:  []redisecho.WorkerQueue{{Queue: q, Concurrency: workers}},
		Handler: mux,
		Lease:   lease,
		OnEvent: func(ev redisecho.JobEvent) {
			switch ev.Kind {
			case "completed":
				logger.Info("email job completed", "id", ev.JobID)
			case "failed":
				logger.Warn("email job failed", "id", ev.JobID, "attempt", ev.Attempt, "willRetry", ev.WillRetry, "error", ev.Error)
			case "dead":
				logger.Error("email job dead", "id", ev.JobID, "error", ev.Error)
			}
		},
	})
	if err != nil {
		return nil, err
	}
	return j, nil
}

// start starts the worker, if there is one.
func (j *jobs) start() error {
	if j.worker == nil {
		return nil
	}
	return j.worker.Start()
}

// shutdown stops the worker within d: running emails finish or go back to
// the queue.
func (j *jobs) shutdown(d time.Duration) {
	if j.worker == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := j.worker.Shutdown(ctx); err != nil {
		j.logger.Warn("job worker: jobs still running at shutdown went back to the queue", "error", err)
	}
}

// sendEmail is the demo sender: about 20 ms of work, then a record of the
// email in Redis. Every attempt for an address starting with "fail@" fails.
func (j *jobs) sendEmail(ctx context.Context, job *redisecho.Job) (any, error) {
	var m email
	if err := job.Decode(&m); err != nil {
		return nil, fmt.Errorf("bad payload: %v: %w", err, redisecho.ErrSkipRetry)
	}
	_ = job.Progress(ctx, map[string]any{"step": "sending"})
	select {
	case <-time.After(sendTime):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if strings.HasPrefix(strings.ToLower(m.To), "fail@") {
		return nil, fmt.Errorf("mailbox %s refused the message", m.To)
	}
	rec, _ := json.Marshal(map[string]any{"job": job.ID, "to": m.To, "subject": m.Subject, "at": time.Now().UTC().Format(time.RFC3339Nano)})
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for _, r := range j.client.DoMulti(cctx,
		j.client.B().Lpush().Key(sentEmailsKey).Element(string(rec)).Build(),
		j.client.B().Ltrim().Key(sentEmailsKey).Start(0).Stop(maxSentEmails-1).Build(),
	) {
		if err := r.Error(); err != nil {
			return nil, err
		}
	}
	return map[string]any{"sent": true}, nil
}

// jobOwner returns the user a job was enqueued by (from its event channel,
// user:<id>), or 0 for an anonymous job.
func jobOwner(info redisecho.JobInfo) int {
	id, err := strconv.Atoi(strings.TrimPrefix(info.Channel, "user:"))
	if err != nil || !strings.HasPrefix(info.Channel, "user:") {
		return 0
	}
	return id
}

// jobView is what GET /api/jobs/:id answers.
type jobView struct {
	ID          string          `json:"id"`
	Type        string          `json:"type"`
	State       string          `json:"state"`
	Attempts    int             `json:"attempts"`
	MaxAttempts int             `json:"maxAttempts"`
	Error       string          `json:"error"`
	Result      json.RawMessage `json:"result"`
}

// mount adds the job routes to api (the /api group, behind its limiter).
func (j *jobs) mount(api *echo.Group, sessions echo.MiddlewareFunc) {
	unavailable := func(err error) error {
		return echo.NewHTTPError(http.StatusServiceUnavailable, "job queue unavailable").SetInternal(err)
	}
	api.POST("/emails", func(c echo.Context) error {
		var in email
		if err := decodeJSON(c, &in, true); err != nil {
			return bodyError(c, err, `Body must be a JSON object {"to", "subject", "body"} of strings`)
		}
		if !strings.Contains(in.To, "@") {
			return jsonError(c, http.StatusBadRequest, `"to" must be an email address`)
		}
		var opts []redisecho.JobOption
		if _, id, ok := current(c); ok {
			opts = append(opts, redisecho.JobChannel(userChannel(id)))
		}
		res, err := j.queue.Enqueue(c.Request().Context(), emailJob, in, opts...)
		switch {
		case errors.Is(err, redisecho.ErrPayloadTooLarge):
			return jsonError(c, http.StatusRequestEntityTooLarge, "The email is too large")
		case err != nil:
			return unavailable(err)
		}
		return c.JSON(http.StatusAccepted, map[string]string{"id": res.ID})
	}, sessions)
	api.GET("/jobs", func(c echo.Context) error {
		counts, err := j.queue.Counts(c.Request().Context())
		if err != nil {
			return unavailable(err)
		}
		return c.JSON(http.StatusOK, counts)
	})
	api.GET("/jobs/:id", func(c echo.Context) error {
		info, err := j.queue.Job(c.Request().Context(), c.Param("id"))
		switch {
		case errors.Is(err, redisecho.ErrJobNotFound), errors.Is(err, redisecho.ErrInvalidJobID):
			return jsonError(c, http.StatusNotFound, "Job not found")
		case err != nil:
			return unavailable(err)
		}
		if owner := jobOwner(info); owner != 0 {
			// Another user's job looks like no job at all.
			if _, id, ok := current(c); !ok || id != owner && id != adminUserID {
				return jsonError(c, http.StatusNotFound, "Job not found")
			}
		}
		v := jobView{ID: info.ID, Type: info.Type, State: string(info.State), Attempts: info.Attempts, MaxAttempts: info.MaxAttempts, Error: info.Error, Result: json.RawMessage("null")}
		if len(info.Result) > 0 && json.Valid(info.Result) {
			v.Result = info.Result
		}
		return c.JSON(http.StatusOK, v)
	}, sessions)
	api.POST("/jobs/:id/retry", func(c echo.Context) error {
		err := j.queue.RetryDead(c.Request().Context(), c.Param("id"))
		switch {
		case errors.Is(err, redisecho.ErrJobNotFound), errors.Is(err, redisecho.ErrInvalidJobID):
			return jsonError(c, http.StatusNotFound, "No dead job with this ID")
		case err != nil:
			return unavailable(err)
		}
		return c.JSON(http.StatusOK, map[string]string{"id": c.Param("id"), "state": string(redisecho.JobPending)})
	}, sessions, requireAdminTo("retry jobs"))
}

// parseJobWorkers reads JOB_WORKERS: the worker's concurrency, 0 for none.
func parseJobWorkers(v string, set bool) (int, error) {
	if !set || strings.TrimSpace(v) == "" {
		return defaultJobWorkers, nil
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n < 0 || n > 1000 {
		return 0, fmt.Errorf("JOB_WORKERS: want a number from 0 (no worker) to 1000; got %q", v)
	}
	return n, nil
}
