#!/usr/bin/perl
# A worker whose tables check nothing keeps no check ticker; a table swapped in with a check
# starts the checks in every worker, and a table without any stops them.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $routes = sub {
    my ($check) = @_;
    my $c = $check ? qq(, "check": {"type": "tcp", "interval": "200ms", "timeout": "150ms", "fall": 1, "rise": 1}) : '';
    return qq({"upstreams": {"u": {"servers": ["127.0.0.1:%%PORT_gone%%", "127.0.0.1:%%PORT_up%%"]$c}},
                "routes": {"u.test": "u"}}\n);
};
$t->write_routes('routes.json', $routes->(0));
$t->backend('up', log => 'up.log');
$t->config(<<'EOF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass nginx_edge; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
EOF
$t->run;
my ($status, $gone, $up) = ($t->port('status'), $t->port('gone'), $t->port('up'));
my $state = sub { Edge::Test::server_state($status, 'u', "127.0.0.1:$_[0]") // {} };
my $probes = sub { my @c = $t->read_file('up.log') =~ /^accept$/mg; scalar @c };

# --- No check in the table: no probe reaches the server, and it is not judged.
wait_for(sub { defined $state->($up)->{state} }, 'the upstream in the status');
my $before = $probes->();
my $until = time + 1.5;
select undef, undef, undef, 0.1 while time < $until;    # a second and a half without checks
is($probes->(), $before, 'no probe while no table checks anything');
is($state->($gone)->{last_check}, undef, 'the server was never checked');

# --- A table with a check: the checks start without a reload.
$t->swap_routes('routes.json', $routes->(1), 2);
wait_for(sub { ($state->($gone)->{state} // '') eq 'down' }, 'the closed server checked down');
pass('a table swapped in with a check starts the checks');
wait_for(sub { $probes->() > $before }, 'probes reaching the live server');
pass('the live server is probed');
is(http_get($t->port('edge'), 'u.test'), 'up', 'routes to the server that answers');

# Each worker woke its own ticker: the leader (which built the table) and the other (which
# mapped it) each go on probing while the other is stopped. No connection is made to the edge
# meanwhile: a stopped worker could be the one to accept it.
my ($leader) = $t->read_file('error.log') =~ /(\d+)#\d+: edge_routes: \S+ table 2 loaded/;
my ($other) = grep { $_ != $leader } $t->read_file('error.log') =~ /(\d+)#\d+: edge_routes: \S+ table 2 in service/g;
ok($leader && $other, "the leader ($leader) and the other worker ($other)");
for my $stopped ($leader, $other) {
    kill 'STOP', $stopped;
    my $from = $probes->();
    # A probe the stopped worker had in flight may still land: two more make sure.
    my $went_on = eval { wait_for(sub { $probes->() >= $from + 2 }, "probes while $stopped is stopped") };
    kill 'CONT', $stopped;
    ok($went_on, 'the checks go on while ' . ($stopped == $leader ? 'the leader' : 'the other worker') . ' is stopped');
}

# --- Back to a table without checks: the probes stop.
$t->swap_routes('routes.json', $routes->(0), 2);
# No probe starts once both workers serve the table; one started before may still land within
# its timeout (150 ms).
$until = time + 1;
select undef, undef, undef, 0.1 while time < $until;
my $settled = $probes->();
$until = time + 1.5;
select undef, undef, undef, 0.1 while time < $until;
is($probes->(), $settled, 'no probe once no table checks anything');

done_testing;
