package redisecho

// Harness addition for the realtime tests: moving one slot of a dedicated
// cluster (newFaultRedis "cluster") from its master to another, the way
// redis-cli --cluster reshard does, while clients keep using it.

import (
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// nodeID returns the cluster node ID of the server at addr (CLUSTER MYID).
func nodeID(addr string) (string, error) {
	v, err := respDo(addr, 2*time.Second, "CLUSTER", "MYID")
	if err != nil {
		return "", err
	}
	id, ok := v.(string)
	if !ok || id == "" {
		return "", fmt.Errorf("CLUSTER MYID on %s: %v", addr, v)
	}
	return id, nil
}

// slotOwner returns the address of the master that owns slot according to
// the first server of f (CLUSTER SLOTS).
func slotOwner(f *faultRedis, slot uint16) (string, error) {
	return slotOwnerSeenBy(f.Servers()[0].addr(), slot)
}

func slotOwnerSeenBy(addr string, slot uint16) (string, error) {
	v, err := respDo(addr, 2*time.Second, "CLUSTER", "SLOTS")
	if err != nil {
		return "", err
	}
	ranges, _ := v.([]any)
	for _, r := range ranges {
		row, _ := r.([]any)
		if len(row) < 3 {
			continue
		}
		start, _ := row[0].(int64)
		end, _ := row[1].(int64)
		master, _ := row[2].([]any)
		if int64(slot) < start || int64(slot) > end || len(master) < 2 {
			continue
		}
		host, _ := master[0].(string)
		port, _ := master[1].(int64)
		return host + ":" + strconv.FormatInt(port, 10), nil
	}
	return "", fmt.Errorf("slot %d has no owner in CLUSTER SLOTS of %s", slot, addr)
}

// moveSlot migrates slot, keys included, from the master that owns it to
// the next master of f, and waits until every master agrees on the new
// owner: CLUSTER SETSLOT IMPORTING on the target and MIGRATING on the
// source, MIGRATE of the slot's keys in batches, then SETSLOT NODE on the
// target, the source and the others. Clients see ASK redirections while
// the keys move and MOVED afterwards; sharded subscribers of the slot get a
// sunsubscribe when the source gives it up.
func moveSlot(t *testing.T, f *faultRedis, slot uint16) (from, to string) {
	t.Helper()
	require.Equal(t, "cluster", f.Topology, "moveSlot needs a cluster")
	servers := f.Servers()
	src, err := slotOwner(f, slot)
	require.NoError(t, err)
	var dst *redisServer
	for i, s := range servers {
		if s.addr() == src {
			dst = servers[(i+1)%len(servers)]
		}
	}
	require.NotNil(t, dst, "slot %d is owned by %s, not one of the harness's masters", slot, src)
	srcID, err := nodeID(src)
	require.NoError(t, err)
	dstID, err := nodeID(dst.addr())
	require.NoError(t, err)
	s := strconv.Itoa(int(slot))

	do := func(addr string, args ...string) any {
		v, err := respDo(addr, 5*time.Second, args...)
		require.NoError(t, err, "%v on %s", args, addr)
		return v
	}
	do(dst.addr(), "CLUSTER", "SETSLOT", s, "IMPORTING", srcID)
	do(src, "CLUSTER", "SETSLOT", s, "MIGRATING", dstID)
	for {
		v := do(src, "CLUSTER", "GETKEYSINSLOT", s, "100")
		keys, _ := v.([]any)
		if len(keys) == 0 {
			break
		}
		args := []string{"MIGRATE", "127.0.0.1", strconv.Itoa(dst.Port()), "", "0", "5000", "REPLACE", "KEYS"}
		for _, k := range keys {
			args = append(args, k.(string))
		}
		do(src, args...)
	}
	do(dst.addr(), "CLUSTER", "SETSLOT", s, "NODE", dstID)
	do(src, "CLUSTER", "SETSLOT", s, "NODE", dstID)
	for _, o := range servers {
		if o.addr() != src && o != dst {
			do(o.addr(), "CLUSTER", "SETSLOT", s, "NODE", dstID)
		}
	}
	require.Eventually(t, func() bool {
		for _, o := range servers {
			if owner, err := slotOwnerSeenBy(o.addr(), slot); err != nil || owner != dst.addr() {
				return false
			}
		}
		return true
	}, 10*time.Second, 20*time.Millisecond, "every master agrees that %s owns slot %d", dst.addr(), slot)
	return src, dst.addr()
}

// TestMoveSlotMovesKeys checks the harness: a slot moves with its keys, and
// a client keeps reading and writing them through the redirections.
func TestMoveSlotMovesKeys(t *testing.T) {
	f := newFaultRedis(t, "cluster")
	c := f.Client()
	key := f.Keys.Key("moved")
	ctx := ctx5s(t)
	require.NoError(t, c.Do(ctx, c.B().Set().Key(key).Value("v").Build()).Error())
	slot := keySlot(key)
	from, to := moveSlot(t, f, slot)
	require.NotEqual(t, from, to)
	owner, err := slotOwner(f, slot)
	require.NoError(t, err)
	require.Equal(t, to, owner)
	got, err := c.Do(ctx, c.B().Get().Key(key).Build()).ToString()
	require.NoError(t, err, "the client follows MOVED")
	require.Equal(t, "v", got)
	_, err = respDo(from, 2*time.Second, "GET", key)
	require.ErrorContains(t, err, "MOVED", "the old owner redirects")
}
