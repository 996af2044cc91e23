#!/usr/bin/perl
# A worker that exits (here at nginx -s reload) with an active check's probe in flight
# closes it: nginx finds no socket left open ("open socket #N left in connection").

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
# A server that accepts and never answers: each TLS probe waits for its 60 s timeout.
$t->backend('quiet', mode => 'silent', log => 'quiet.log');
$t->write_routes('routes.json', <<'EOF2');
{"upstreams": {"q": {"servers": ["127.0.0.1:%%PORT_quiet%%"],
                     "check": {"type": "tls", "interval": "60s", "timeout": "60s"}}},
 "routes": {"q.test": "q"}}
EOF2
$t->config(<<'EOF2');
    edge_routes %%TESTDIR%%/routes.json;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
EOF2
$t->run;
my $accepted = sub { scalar(() = $t->read_file('quiet.log') =~ /accept/g) };
wait_for(sub { $accepted->() >= 1 }, 'a probe in flight');
$t->reload;
wait_for(sub { $t->read_file('error.log') =~ /worker process \d+ exited with code/ }, 'the old worker exited');
$t->stop;
unlike($t->read_file('error.log'), qr/open socket #\d+ left in connection/,
    'no probe socket left open by an exiting worker');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'no alert');
done_testing;
