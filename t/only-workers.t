#!/usr/bin/perl
# nginx calls every module's init_process in its cache manager and cache loader too (an
# http {} block with a proxy_cache_path starts them). The module runs in worker processes only:
# no helper reads tables, takes the lead, or swaps a table in.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $routes = <<'EOF';
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"],
                     "check": {"type": "tcp", "interval": "1s"}}},
 "routes": {"a.test": "a", "%%NAME%%": "a"}}
EOF
my $write = sub { $t->write_routes('routes.json', $routes =~ s/%%NAME%%/$_[0]/r) };
$write->('one.test');
my $user = $> == 0 ? "user nobody nogroup;\n" : '';
$t->write_file('nginx.conf', $t->expand(<<"EOF"));
%%MODULES%%
${user}daemon off;
master_process on;
worker_processes 2;
pid %%TESTDIR%%/nginx.pid;
error_log %%TESTDIR%%/error.log info;
events { worker_connections 128; }
http {
    access_log off;
    proxy_cache_path %%TESTDIR%%/cache keys_zone=pages:1m;
    server { listen 127.0.0.1:%%PORT_web%%; location / { proxy_cache pages; return 200 "web\\n"; } }
}
stream {
    edge_routes %%TESTDIR%%/routes.json;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
}
EOF
$t->run;
my $log = sub { $t->read_file('error.log') };
wait_for(sub { $log->() =~ /start cache manager process \d+/ && $log->() =~ /start cache loader process \d+/ },
    'the cache helpers');
my %helper = map { $_ => 1 } $log->() =~ /start cache (?:manager|loader) process (\d+)/g;
my %worker = map { $_ => 1 } $log->() =~ /start worker process (\d+)/g;
is(scalar keys %helper, 2, 'nginx started its cache manager and loader');
is(http_get($t->port('edge'), 'a.test'), 'a', 'routes');

# Two changes: every worker serves each; a helper that ran the module would swap them too.
my $in_service = sub {
    my ($gen) = @_;
    my %pids = map { $_ => 1 } $log->() =~ /\[notice\] (\d+)#\d+: edge_routes: \S+: table $gen in service/g;
    return \%pids;
};
for my $gen (2, 3) {
    $write->("gen$gen.test");
    wait_for(sub { my $p = $in_service->($gen); !grep { !$p->{$_} } keys %worker },
        "every worker serves table $gen");
    is(http_get($t->port('edge'), "gen$gen.test"), 'a', "table $gen routes");
}
my @by_helpers = grep { $helper{$_} } keys %{$in_service->(2)}, keys %{$in_service->(3)};
is_deeply(\@by_helpers, [], 'no cache helper swapped a table in');
my @helper_lines = grep { /^\S+ \S+ \[\w+\] (\d+)#/ && $helper{$1} && /edge/ } split /\n/, $log->();
is_deeply(\@helper_lines, [], 'no cache helper logged anything of the module');
done_testing;
