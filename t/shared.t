#!/usr/bin/perl
# One table per edge: with 4 workers, a change is read and compiled by one of them (the
# leader), published as an image file in the state folder, and mapped by the others. A
# leader killed with SIGKILL is replaced; an image that is not intact is refused while the
# last good table keeps serving; a state folder the workers cannot write makes each worker
# read the source itself again; one that cannot be made fails nginx -t.

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
$all_say->('b', '20 connections in a row reach the new backend');
my @images = glob "$dir/state/routes-*-2.img";
is(scalar @images, 1, 'the image is in the state folder');
my ($leader) = $t->read_file('error.log') =~ /(\d+)#\d+: edge_routes: \S+ table 2 loaded/;
ok($leader, "worker $leader leads");

$t->write_routes('routes.json', table('a', ', "three.test": "a"'));
wait_for(sub { $count->(qr/table 3 in service/) == $workers }, 'every worker serves table 3');
is(scalar(() = glob "$dir/state/routes-*-2.img"), 0, 'the replaced image is removed');
is(scalar(() = glob "$dir/state/routes-*-3.img"), 1, 'the new one is there');

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

# --- An image that is not intact (replaced by a truncated copy) is refused by a worker that
# starts and would map it; it serves its last good table meanwhile.
my ($current) = glob "$dir/state/routes-*-$next.img";
ok($current, 'the current image');
open my $in, '<', $current or die;
binmode $in;
local $/;
my $bytes = <$in>;
close $in;
open my $out, '>', "$current.tmp" or die;
print {$out} substr($bytes, 0, length($bytes) - 8);
close $out;
rename "$current.tmp", $current or die;
# A worker that does not lead, so that the lead (and the table published) stays.
my ($lead) = $t->read_file('error.log') =~ /(\d+)#\d+: edge_routes: \S+ table $next loaded/;
my ($follower) = grep { /^\d+$/ && $_ != $lead } split /\s+/, `ps -o pid= --ppid ${\ $t->pid}`;
kill 'KILL', $follower;
$t->wait_for_log(qr/table $next cannot be loaded: \S+: the header says \d+ bytes, the image has \d+; the last good table keeps serving/);
like(http_get($edge, 'app.test'), qr/^[ab]$/, 'connections are still served');
$t->write_routes('routes.json', table('a', ', "five.test": "a"'));
$all_say->('a', 'the next change reaches every worker again');

# --- The leader killed with SIGKILL while it reads a larger change: another worker takes
# the lead and reads it; every worker serves it.
my $big = join '', map { qq{, "f$_.big.test": "b"} } 1 .. 20_000;
($lead) = $t->read_file('error.log') =~ /.*\b(\d+)#\d+: edge_routes: \S+ table \d+ loaded/s;
$mark = length $t->read_file('error.log');
$t->write_routes('routes.json', table('b', $big));
kill 'KILL', $lead;
wait_for(sub { $since->() =~ /worker process $lead exited on signal 9/ }, 'the leader gone', 120);
my $killed_during;
wait_for(sub { ($killed_during) = $since->() =~ /table (\d+) loaded, 20001 routes/ }, 'the change read by the next leader', 120);
wait_for(sub { $count->(qr/table $killed_during in service/) >= $workers }, "every worker serves table $killed_during", 120);
$all_say->('b', 'a leader killed during a change: the change still reaches every worker');

# --- A state folder the workers cannot write: each worker reads the source itself.
chmod 0500, "$dir/state";
$t->write_routes('routes.json', table('b', ', "six.test": "b"'));
$t->wait_for_log(qr/the table cannot be published for the other workers \(.*Permission denied.*\): each worker reads the source itself from now on/);
$all_say->('b', 'the change reaches every worker all the same');
chmod 0700, "$dir/state";
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
