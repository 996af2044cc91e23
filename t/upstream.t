#!/usr/bin/perl
# Backend selection: retries past a refusing server, servers without a port, nginx upstream{}
# routes, PROXY protocol listeners, closing when nothing matches, and config-time checks.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get raw_exchange);

my $t = Edge::Test->new;
my $closed = $t->port('closed');    # nothing listens there: connect() is refused
$t->write_routes('routes.json', <<'EOF');
{
  "upstreams": {
    "retry": {"servers": ["127.0.0.1:%%PORT_closed%%", "127.0.0.1:%%PORT_b%%"]},
    "dead": {"servers": ["127.0.0.1:%%PORT_closed%%"]},
    "backup": {"servers": [{"address": "127.0.0.1:%%PORT_a%%", "weight": 3},
                           {"address": "127.0.0.1:%%PORT_b%%", "backup": true}]},
    "portless": {"servers": ["127.0.0.2"]},
    "vhosts": {"nginx_upstream": "local_vhosts"}
  },
  "routes": {
    "retry.test": "retry",
    "dead.test": "dead",
    "backup.test": "backup",
    "portless.test": "portless",
    "vhosts.test": "vhosts"
  }
}
EOF
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json;
    upstream local_vhosts { server 127.0.0.1:%%PORT_v%%; }
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream;
             proxy_connect_timeout 5s; }
    server { listen 127.0.0.1:%%PORT_pp%% proxy_protocol; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "backend-a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "backend-b"; }
    server { listen 127.0.0.1:%%PORT_v%%; return "backend-vhosts"; }
    server { listen 127.0.0.2:%%PORT_edge%%; return "backend-portless"; }
EOF
$t->run;
my $edge = $t->port('edge');

for my $i (1 .. 4) {
    is(http_get($edge, 'retry.test'), 'backend-b', "retry past a refusing server ($i)");
}
like($t->read_file('error.log'), qr/connect\(\) failed \(111: Connection refused\) while .*upstream: "127\.0\.0\.1:$closed"/,
    'the refused connect is logged by nginx');
$t->wait_for_log(qr/name=retry\.test route=retry\.test upstream=nginx_edge alpn= addr=127\.0\.0\.1:$closed, 127\.0\.0\.1:\d+ status=200/, 'access.log');

is(http_get($edge, 'dead.test'), '', 'every server refusing: the client is closed');
$t->wait_for_log(qr/name=dead\.test .* status=502/, 'access.log');

my %seen;
$seen{http_get($edge, 'backup.test')}++ for 1 .. 6;
is_deeply(\%seen, {'backend-a' => 6}, 'a backup server is not used while the primary answers');

is(http_get($edge, 'portless.test'), 'backend-portless', 'a server without a port takes the listener\'s port');
is(http_get($edge, 'vhosts.test'), 'backend-vhosts', 'nginx_upstream route reaches the upstream{} block');
$t->wait_for_log(qr/name=vhosts\.test route=vhosts\.test upstream=local_vhosts /, 'access.log');

is(http_get($edge, 'nowhere.test'), '', 'no route and no default: closed');
$t->wait_for_log(qr/\[info\].*edge: no route for "nowhere\.test" \(http\) and no default, closing while prereading client data, client: 127\.0\.0\.1/);
$t->wait_for_log(qr/name=nowhere\.test route=- upstream=- .* status=403/, 'access.log');

my $pp = "PROXY TCP4 192.0.2.7 127.0.0.1 40000 80\r\n";
is(raw_exchange($t->port('pp'), [$pp . "GET / HTTP/1.1\r\nHost: vhosts.test\r\n\r\n"]), 'backend-vhosts',
    'listen ... proxy_protocol: the Host after the PROXY header routes');

unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]|no host in upstream/, 'no alerts in error.log');
$t->stop;

# Configuration-time checks.
$t->write_routes('routes.json', '{"upstreams": {"l": {"nginx_upstream": "missing"}}, "routes": {"l.test": "l"}}');
my ($ok, $out) = $t->test_config;
ok(!$ok, 'nginx -t fails on an nginx_upstream that does not exist');
like($out, qr/upstreams\.l\.nginx_upstream: no "upstream missing \{\}" block/, 'and says which') or diag($out);

$t->write_routes('routes.json', '{}');
$t->config(<<'EOF');
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
EOF
($ok, $out) = $t->test_config;
ok(!$ok, 'edge_route without edge_routes is refused');
like($out, qr/"edge_route" needs "edge_routes" or "edge_routes_url" in this server or in stream/, 'with a clear message');

$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json interval=soon;
EOF
($ok, $out) = $t->test_config;
like($out, qr/invalid interval "soon"/, 'a bad interval is refused');

$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json;
    upstream nginx_edge { server 127.0.0.1:1; }
EOF
($ok, $out) = $t->test_config;
like($out, qr/duplicate upstream "nginx_edge"/, 'the nginx_edge group name is reserved');

done_testing;
