#!/usr/bin/perl
# A list's pages, and the watch that follows them, on one connection (HTTP/1.1 keep-alive):
# a cluster of thousands of objects is listed without a connection (and a TLS handshake)
# per page. A server that closes a connection it answered as kept (an idle timeout) costs
# nothing but a new connection: no error, no backoff.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $kube = Edge::FakeKube->new($t, 'a');
my $count = 1100;    # three pages of 500
$kube->add(Edge::FakeKube::ingress('ns' . ($_ % 7), "ing$_", hosts => ["h$_.test"])) for 1 .. $count;
$kube->start;
$t->write_routes('routes.json', <<'EOF2');
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}}
EOF2
my $url = $kube->url;
$t->config(<<"EOF2");
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=a format=k8s upstream=a timeout=5s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF2
$t->run;
my $edge = $t->port('edge');
wait_for(sub { http_get($edge, "h$count.test") eq 'a' }, 'every page routed', 60);
wait_for(sub { $kube->watching >= 1 }, 'the ingresses watched');

# The Ingresses' requests: three pages, then the watch.
my $ingresses = sub { grep { $_->[1] =~ m{/ingresses\?} } @{$kube->requests} };
my @pages = grep { $_->[1] =~ m{limit=} && $_->[1] !~ m{watch=} } $ingresses->();
my ($watch) = grep { $_->[1] =~ m{watch=1} } $ingresses->();
is(scalar @pages, 3, 'three pages');
is(scalar(keys %{{ map { $_->[5] => 1 } @pages }}), 1, 'all on one connection');
is($watch->[5], $pages[0][5], 'and so is the watch that follows them');

# The server closes each connection right after answering it as kept: a new one each time.
my $mark = length $t->read_file('error.log');
my $before = () = $ingresses->();
$kube->set_mode('drop-kept');
$kube->compact;
$kube->stop;
$kube->apply(Edge::FakeKube::ingress('web', 'after', hosts => ['after.test']));
$kube->compact;
$kube->start;
wait_for(sub { http_get($edge, 'after.test') eq 'a' }, 'the relist after 410', 60);
my @relist = grep { $_->[1] =~ m{limit=} && $_->[1] !~ m{watch=} } (($ingresses->())[$before .. $ingresses->() - 1]);
cmp_ok(scalar(keys %{{ map { $_->[5] => 1 } @relist }}), '>=', 3, 'each page of the relist on a connection of its own');
# (The server's stop above cuts the watch: that one is an error.)
my @errors = grep { /\[error\].*edge_routes_url.*without an answer/ } split /\n/, substr($t->read_file('error.log'), $mark);
is_deeply(\@errors, [], 'a kept connection the server closed is no error');
done_testing;
