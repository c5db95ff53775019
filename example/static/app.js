// The demo page of the example app: joins a room over Server-Sent Events
// (GET /events), shows its messages, posts new ones (POST
// /rooms/:room/messages), and keeps working across reconnects.
//
// EventSource reconnects by itself only after a stream that ended or broke;
// on any answer other than 200 (a 503 while the server starts, or Redis is
// down) it gives up for good. So the page reconnects by itself, always:
// with a growing, jittered delay (0.5 s doubling up to 5 s), and with the
// last event ID it saw in the lastEventId query parameter, so the server
// replays exactly what the page missed, in order.
'use strict';

(() => {
  const $ = (sel) => document.querySelector(sel);
  const params = new URLSearchParams(location.search);
  let room = params.get('room') || 'lobby';
  let lastEventId = ''; // the id: of the last event received, any channel
  let source = null;
  let retryTimer = 0;
  let attempt = 0;
  let who = ''; // the logged-in user's name, '' when anonymous

  function setStatus(state, text) {
    const s = $('#status');
    s.dataset.state = state;
    s.textContent = text;
  }

  // line appends an entry to the list; parts are [className, text] pairs,
  // set as text (never as HTML).
  function line(kind, ...parts) {
    const li = document.createElement('li');
    li.className = kind;
    for (const [cls, text] of parts) {
      const span = document.createElement('span');
      span.className = cls;
      span.textContent = text;
      li.append(span);
    }
    const list = $('#messages');
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(li);
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function clock(ts) {
    const d = new Date(ts);
    return isNaN(d) ? '' : d.toLocaleTimeString();
  }

  // on listens to one event name; each event's id becomes the position to
  // resume from.
  function on(es, name, handle) {
    es.addEventListener(name, (e) => {
      if (e.lastEventId) lastEventId = e.lastEventId;
      let data;
      try { data = JSON.parse(e.data); } catch { return; }
      handle(data);
    });
  }

  // refusal is why the server would refuse the room (400 or 403, which
  // retrying never mends; EventSource cannot tell them from an outage), or
  // '' when it would not.
  function refusal() {
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(room)) return 'Room names are 1-64 characters of A-Z, a-z, 0-9, _ and -.';
    if (room === 'admin' && who !== 'alice') return 'Only alice, the demo admin, may join #admin.';
    return '';
  }

  function connect() {
    clearTimeout(retryTimer);
    if (source) source.close();
    source = null;
    const refused = refusal();
    if (refused) {
      setStatus('refused', 'not connected');
      line('error', ['text', refused]);
      return;
    }
    const q = new URLSearchParams({ rooms: room });
    if (lastEventId) q.set('lastEventId', lastEventId);
    const es = new EventSource('/events?' + q);
    source = es;
    es.onopen = () => {
      attempt = 0;
      setStatus('live', 'live in #' + room);
    };
    on(es, 'chat:message', (m) => line('chat', ['time', clock(m.timestamp)], ['user', m.username + ':'], ['text', m.text]));
    on(es, 'user:joined', (m) => line('info', ['text', m.username + ' joined #' + m.room]));
    on(es, 'notification', (m) => line('notification', ['time', clock(m.timestamp)], ['text', 'Notification from ' + m.from + ': ' + m.message]));
    on(es, 'order:updated', (m) => line('order', ['text', 'Order ' + m.orderId + ' of user ' + m.userId + ' is now ' + m.status]));
    on(es, 'reset', (m) => line('info', ['text', 'Some earlier messages of ' + (m.channels || []).join(', ') + ' are no longer available.']));
    on(es, 'disconnect', (m) => {
      if (m.reason === 'shutdown') setStatus('reconnecting', 'server restarting…');
    });
    es.onerror = () => {
      // Closed by the server, refused, or a non-200 answer: reconnect
      // ourselves, from the last position. EventSource's own lastEventId
      // also counts an id: sent without an event, and events the page
      // does not listen to.
      if (es.lastEventId) lastEventId = es.lastEventId;
      es.close();
      if (source !== es) return;
      source = null;
      const delay = Math.min(5000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
      attempt++;
      setStatus('reconnecting', 'reconnecting…');
      retryTimer = setTimeout(connect, delay);
    };
  }

  async function call(method, path, body) {
    const resp = await fetch(path, {
      method,
      headers: body === undefined ? {} : { 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
    });
    let data = {};
    try { data = await resp.json(); } catch { /* no JSON body */ }
    return { status: resp.status, data };
  }

  async function whoAmI() {
    const { status, data } = await call('GET', '/profile');
    who = status === 200 ? data.username : '';
    $('#who').textContent = who || 'anonymous';
    $('#login').hidden = status === 200;
    $('#logout').hidden = status !== 200;
  }

  $('#join').room.value = room;
  $('#join').addEventListener('submit', (e) => {
    e.preventDefault();
    room = e.target.room.value;
    const url = new URL(location.href);
    url.searchParams.set('room', room);
    history.replaceState(null, '', url);
    $('#messages').replaceChildren();
    connect(); // the position of the user's channel carries over; the new room starts live
  });

  $('#post').addEventListener('submit', async (e) => {
    e.preventDefault();
    const input = e.target.text;
    const text = input.value;
    if (!text) return;
    try {
      const { status, data } = await call('POST', '/rooms/' + encodeURIComponent(room) + '/messages', { text });
      if (status === 202) {
        input.value = ''; // it shows up when the stream delivers it
      } else {
        line('error', ['text', 'Not sent (' + status + '): ' + (data.error || 'error')]);
      }
    } catch (err) {
      line('error', ['text', 'Not sent: ' + err.message]);
    }
  });

  $('#login').addEventListener('submit', async (e) => {
    e.preventDefault();
    const f = e.target;
    const { status, data } = await call('POST', '/login', { username: f.username.value, password: f.password.value });
    if (status !== 200) {
      line('error', ['text', 'Login failed: ' + (data.error || status)]);
      return;
    }
    f.password.value = '';
    await whoAmI();
    connect(); // now with the user's own channel
  });

  $('#logout').addEventListener('click', async () => {
    await call('POST', '/logout');
    await whoAmI(); // the server ended the stream; it reconnects anonymous
  });

  whoAmI().catch(() => {}).finally(connect);
})();
