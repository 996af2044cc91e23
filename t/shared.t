#!/usr/bin/perl
# One table per edge: with 4 workers, a change is read and compiled by one of them (the
# leader), published as a sealed memfd that the leader keeps open, and mapped by the others
# (nothing in the state folder). Nobody, root included, can write it. A leader killed with
# SIGKILL is replaced, also in the middle of a change; a state folder that cannot be made
# fails nginx -t.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
my $workers = 4;

sub table {
    my ($backend, $extra) = @_;
    return qq({"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}, "b": {"servers": ["127.0.0.1:%%PORT_b%%"]}},
 "routes": {"app.test": "$backend"$extra}});
}
$t->write_routes('routes.json', table('a', ''));
$t->config(<<'EOF', workers => $workers);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
EOF
$t->run;
my $edge = $t->port('edge');
my $count = sub { my ($re) = @_; scalar(() = $t->read_file('error.log') =~ /$re/g) };
my $all_say = sub {
    my ($want, $what) = @_;
    my $streak = 0;
    wait_for(sub { $streak = http_get($edge, 'app.test') eq $want ? $streak + 1 : 0; $streak >= 20 }, $what);
    pass($what);
};

# --- A change: read once, in service in every worker.
$t->write_routes('routes.json', table('b', ''));
wait_for(sub { $count->(qr/table 2 in service/) == $workers }, 'every worker serves table 2');
is($count->(qr/table 2 loaded/), 1, 'the change was read and compiled once for the 4 workers');
# A small change is read, mapped and freed in the event loop: no worker starts a thread (one
# would make glibc's system calls and malloc dearer for every later connection).
is($count->(qr/table 2 in service; .*; threads started by this worker: 0$/m), $workers,
    'no worker started a thread for a small change');
$all_say->('b', '20 connections in a row reach the new backend');
my ($leader) = $t->read_file('error.log') =~ /(\d+)#\d+: edge_routes: \S+ table 2 loaded/;
ok($leader, "worker $leader leads");
# The memfd of a generation: the leader holds it open, every worker maps it.
my $memfd = sub { my ($gen) = @_; qr{/memfd:edge-routes-[0-9a-f]{16}-$gen\b} };
my @workers = grep { /^\d+$/ } split /\s+/, `ps -o pid= --ppid ${\ $t->pid}`;
my $held = sub {
    my ($pid, $gen) = @_;
    return grep { (readlink($_) // '') =~ $memfd->($gen) } glob "/proc/$pid/fd/*";
};
# Looking into another user's /proc/PID/fd takes CAP_SYS_PTRACE, which a container's root
# lacks by default (the workers themselves need no capability: they share a user).
my $inspect = grep { defined readlink $_ } glob "/proc/$leader/fd/*";
SKIP: {
    skip "this test may not look into the workers' /proc/PID/fd", 3 unless $inspect;
    my ($fd) = $held->($leader, 2);
    ok($fd, "the leader holds table 2 in a memfd ($fd)");
    my $maps = sub { open my $f, '<', "/proc/$_[0]/maps" or return ''; local $/; scalar <$f> };
    is(scalar(grep { $maps->($_) =~ $memfd->(2) } @workers), $workers, 'every worker maps it');
    if (open my $w, '>>', $fd) {
        ok(!(print {$w} 'x') || !close($w), 'a write to it fails, as root');
    } else {
        pass("it cannot even be opened for writing: $!");
    }
}
is(scalar(() = glob "$dir/state/*"), 0, 'nothing is written to the state folder');

$t->write_routes('routes.json', table('a', ', "three.test": "a"'));
wait_for(sub { $count->(qr/table 3 in service/) == $workers }, 'every worker serves table 3');
SKIP: {
    skip "this test may not look into the workers' /proc/PID/fd", 2 unless $inspect;
    is(scalar($held->($leader, 2)), 0, 'the leader closed the memfd of table 2');
    is(scalar($held->($leader, 3)), 1, 'and holds the one of table 3');
}

# --- The leader killed: another worker takes over; the new worker maps the current table.
my $mark = length $t->read_file('error.log');
kill 'KILL', $leader;
my $since = sub { substr($t->read_file('error.log'), $mark) };
wait_for(sub { $since->() =~ /worker process $leader exited on signal 9/ }, 'the leader gone');
my $new;
wait_for(sub { ($new) = $since->() =~ /start worker process (\d+)/ }, 'its replacement');
# (The worker that takes the lead reads the source once more: its own view of the files is
# the master's; that may publish the same table under the next number.)
wait_for(sub { $since->() =~ /$new#\d+: edge_routes: \S+ table [34] in service/ }, 'the replacement serves the table');
pass("the replacement worker $new maps the published table");
wait_for(sub { my ($n) = $since->() =~ /.*table (\d+) in service/s; $n && $count->(qr/table $n in service/) >= $workers }, 'settled');
$mark = length $t->read_file('error.log');
$t->write_routes('routes.json', table('b', ', "four.test": "b"'));
my $next;
wait_for(sub { ($next) = $since->() =~ /table (\d+) loaded/ }, 'the change read');
wait_for(sub { $count->(qr/table $next in service/) == $workers }, "every worker serves table $next");
is($count->(qr/table $next loaded/), 1, "after the leader was killed, one worker read the change (table $next)");
$all_say->('b', 'and it reaches every worker');

# --- The leader killed with SIGKILL while it reads a larger change: another worker takes
# the lead and reads it; every worker serves it.
my $big = join '', map { qq{, "f$_.big.test": "b"} } 1 .. 20_000;
my ($lead) = $t->read_file('error.log') =~ /.*\b(\d+)#\d+: edge_routes: \S+ table \d+ loaded/s;
$mark = length $t->read_file('error.log');
$t->write_routes('routes.json', table('b', $big));
kill 'KILL', $lead;
wait_for(sub { $since->() =~ /worker process $lead exited on signal 9/ }, 'the leader gone', 120);
my $killed_during;
wait_for(sub { ($killed_during) = $since->() =~ /table (\d+) loaded, 20001 routes/ }, 'the change read by the next leader', 120);
wait_for(sub { $count->(qr/table $killed_during in service/) >= $workers }, "every worker serves table $killed_during", 120);
$all_say->('b', 'a leader killed during a change: the change still reaches every worker');

$t->stop;

# --- A state folder that cannot be made fails nginx -t.
my $u = Edge::Test->new;
$u->write_routes('routes.json', '{"routes": {}}');
$u->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json;
    edge_state /proc/edge-state-cannot-be-made;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
EOF
my ($ok, $msg) = $u->test_config;
ok(!$ok, 'nginx -t refuses a state folder that cannot be made');
like($msg, qr/mkdir\(\) "\/proc\/edge-state-cannot-be-made" failed/, 'and says why');

done_testing;
