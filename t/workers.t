#!/usr/bin/perl
# A worker's life: the connection counts of a worker killed with SIGKILL are taken back by its
# replacement; a replaced table is freed once its last session ends (off the event loop when
# large); a
# connection refused by `deny` is nginx's to log; fail open is logged once per worker, not
# once per table generation.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Edge::Test qw(http_get http_request raw_exchange wait_for);

my $t = Edge::Test->new;
my $routes = <<'EOF';
{
  "upstreams": {
    "held": {"servers": ["127.0.0.1:%%PORT_h%%"], "balance": "least_conn"},
    "dead": {"servers": ["127.0.0.1:%%PORT_gone1%%", "127.0.0.1:%%PORT_gone2%%"],
             "fail_timeout": "60s"}
  },
  "routes": {"held.test": "held", "dead.test": "dead"%%EXTRA%%}
}
EOF
sub routes { my ($extra) = @_; (my $r = $routes) =~ s/%%EXTRA%%/$extra/; $t->write_routes('routes.json', $r) }
routes('');
$t->backend('h', mode => 'hold');
# Two ports nothing listens on.
$t->port($_) for qw(gone1 gone2);
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_denied%%; deny 127.0.0.1; edge_route http;
             proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
EOF
$t->run;
my ($edge, $status, $h) = ($t->port('edge'), $t->port('status'), $t->port('h'));
# undef while no worker answers.
my $active = sub { eval { (Edge::Test::server_state($status, 'held', "127.0.0.1:$h") // {})->{active} } };

sub hold {
    my $c = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10) or die "connect: $!\n";
    syswrite($c, http_request('held.test'));
    sysread($c, my $got, 1) or die "no answer from the held backend\n";
    return $c;
}

# --- A replaced table is freed once its last session is gone: a small one in the event loop,
# a large one on a thread.
my $c = hold();
routes(', "new.test": "held"');
$t->wait_for_log(qr/table 2 in service/);
my $freed = qr/routes\.json: table 1 is no longer used, freed$/m;
# The swap itself looked at table 1 and found the session using it.
unlike($t->read_file('error.log'), qr/table 1 is no longer used/, 'not freed while a session uses it');
close $c;
$t->wait_for_log($freed);
pass('a small table freed in the event loop once the session ended');
like($t->read_file('error.log'), qr/table 2 in service; .*; threads started by this worker: 0$/m,
    'a small change starts no thread');
# Large to free: 600 upstreams of one server each (its routes are one image, whatever their
# number).
my $ups = join ', ', map { qq("u$_": {"servers": ["127.0.0.1:%%PORT_h%%"]}) } 1 .. 600;
my $names = join ', ', map { qq("u$_.test": "u$_") } 1 .. 600;
$t->write_routes('routes.json', qq({"upstreams": {$ups, "held": {"servers": ["127.0.0.1:%%PORT_h%%"]}},
    "routes": {"held.test": "held", $names}}\n));
$t->wait_for_log(qr/table 3 in service/);
like($t->read_file('error.log'), qr/table 3 in service; .*; threads started by this worker: [1-9]/,
    'a large one is built on a thread');
$c = hold();
routes('');
$t->wait_for_log(qr/table 4 in service/);
unlike($t->read_file('error.log'), qr/table 3 is no longer used/, 'a large table kept while a session uses it');
close $c;
$t->wait_for_log(qr/routes\.json: table 3 is no longer used, freed off the event loop$/m);
pass('a large table (600 upstreams) freed on a thread once the session ended');

# --- Counts of a killed worker.
my @held = map { hold() } 1 .. 3;
wait_for(sub { ($active->() // 0) == 3 }, '3 active connections');
my $master = $t->pid;
my ($worker) = grep { /^\d+$/ } split /\s+/, `ps -o pid= --ppid $master`;
ok($worker, "worker $worker");
kill 'KILL', $worker;
wait_for(sub {
    my @now = grep { /^\d+$/ } split /\s+/, `ps -o pid= --ppid $master`;
    @now && !grep { $_ == $worker } @now;
}, 'a new worker');
close $_ for @held;
my $after = wait_for(sub { defined(my $a = $active->()) or return; [$a] }, 'status from the new worker');
is($after->[0], 0, 'the killed worker\'s 3 connections are no longer counted');
like($t->read_file('error.log'), qr/worker process $worker exited without releasing its connection counts; 3 taken back/,
    'and that is logged');
my $again = hold();
wait_for(sub { ($active->() // 0) == 1 }, 'a new connection counts from zero');
pass('a new connection counts once');
close $again;

# --- deny closes the connection before the preread phase: nginx logs it, the module does not.
my $mark = length $t->read_file('error.log');
is(raw_exchange($t->port('denied'), [http_request('held.test')]), '', 'denied');
$t->wait_for_log(qr/access forbidden by rule/);
unlike(substr($t->read_file('error.log'), $mark), qr/client closed before sending/,
    'not logged as a client that closed');

# --- Fail open: every server of "dead" down; logged once although the table changes.
http_get($edge, 'dead.test') for 1 .. 2;
wait_for(sub { $t->read_file('error.log') =~ /every server of upstream "dead" is down, trying them anyway/ },
    'fail open');
# (A replacement worker numbers tables from the master's: wait for any new one.)
my $before = length $t->read_file('error.log');
routes(', "other.test": "held"');
wait_for(sub { substr($t->read_file('error.log'), $before) =~ /table \d+ in service/ }, 'the new table');
http_get($edge, 'dead.test') for 1 .. 3;
wait_for(sub { scalar(() = $t->read_file('access.log') =~ /name=dead\.test/g) >= 5 }, 'five sessions logged');
is(scalar(() = $t->read_file('error.log') =~ /every server of upstream "dead" is down, trying them anyway/g), 1,
    'fail open logged once across table generations');

done_testing;
